"""Where the platform's own outgoing requests may go (SSRF): a judge endpoint's host must resolve to public
addresses only, never private, loopback, link-local (cloud metadata at 169.254.169.254), shared, reserved
or multicast ones, unless the operator lists the host in TUNEFORGE_JUDGE_ALLOWED_HOSTS.

The check runs twice: when a job naming the endpoint is submitted or a judge is built (check_url), and at
connection time (GuardedBackend), where the address checked is the address connected to, so a host that
answers DNS with a public address first and a private one later (DNS rebinding) is still refused.
Stdlib and httpcore only; no torch.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

# Metadata services not covered by the ranges below (169.254.169.254 is link-local): AWS's IPv6 one,
# Alibaba's, and Oracle's / Azure's well-known addresses inside link-local.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))


class AddressRefused(ValueError):
    """An outgoing request to an address the platform may not reach."""


def address_problem(address: str) -> str | None:
    """Why the platform may not connect to this IP address, or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return {"link_local": "a link-local (cloud metadata) address"}.get(kind, f"a {kind} address")
    if not ip.is_global:
        return "a non-public address"  # shared (100.64/10), documentation and other special ranges
    return None


def allowed_hosts(raw: str) -> frozenset[str]:
    """TUNEFORGE_JUDGE_ALLOWED_HOSTS ("judge.internal, 10.0.0.5") as lower-case host names."""
    return frozenset(h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip())


def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to (a module function, so tests can stand in for DNS)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def checked_addresses(host: str, port: int, *, allowed: Iterable[str] = ()) -> list[str]:
    """The addresses to connect to for host:port, each one checked; AddressRefused naming the host and the
    address otherwise. An allowed host is resolved but not checked."""
    name = host.strip("[]").lower().rstrip(".")
    try:
        addresses = resolve(name, port)
    except OSError as exc:
        raise AddressRefused(f"host {host!r} does not resolve ({exc})") from None
    if name in set(allowed):
        return addresses
    for address in addresses:
        if problem := address_problem(address):
            raise AddressRefused(f"host {host!r} resolves to {address}, {problem}; the server does not connect to "
                                 "private, loopback, link-local or metadata addresses (an operator may allow the "
                                 "host in TUNEFORGE_JUDGE_ALLOWED_HOSTS)")
    return addresses


def check_url(url: str, *, allowed: Iterable[str] = ()) -> None:
    """AddressRefused unless url is http(s) and its host resolves to addresses the platform may reach."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressRefused(f"{url!r} is not an http:// or https:// URL with a host")
    checked_addresses(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed=allowed)


class GuardedBackend:
    """An httpcore network backend that connects only to checked addresses: it resolves the host itself,
    checks every address, and connects to one of those (TLS still verifies the host name)."""

    def __init__(self, allowed: Iterable[str] = ()):
        from httpcore import SyncBackend

        self.allowed = frozenset(allowed)
        self._backend = SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None):
        from httpcore import ConnectError

        try:
            addresses = checked_addresses(host, port, allowed=self.allowed)
        except AddressRefused as exc:
            raise ConnectError(str(exc)) from exc
        last: Exception | None = None
        for address in addresses:
            try:
                return self._backend.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                 socket_options=socket_options)
            except ConnectError as exc:
                last = exc
        raise last or ConnectError(f"host {host!r} has no address")

    def connect_unix_socket(self, *args, **kwargs):
        raise AddressRefused("the server does not connect to unix sockets for outgoing requests")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def guarded_transport(allowed: Iterable[str] = (), **kwargs):
    """An httpx transport whose every connection goes through GuardedBackend (no proxies from the
    environment: a proxy would connect on our behalf, past the check)."""
    import httpx

    transport = httpx.HTTPTransport(**kwargs)
    # httpx builds its httpcore pool without a backend argument; swap in ours before the first request.
    transport._pool._network_backend = GuardedBackend(allowed)
    return transport


def judge_endpoint_problem(name: str, settings) -> str | None:
    """Why a judge may not call the configured endpoint `name` (unknown, or its host refused), or None."""
    endpoint = settings.judge_endpoints.get(name)
    if endpoint is None:
        configured = ", ".join(sorted(settings.judge_endpoints)) or "none (TUNEFORGE_JUDGE_ENDPOINTS is empty)"
        return f"judge endpoint {name!r} is not configured; the configured endpoints are: {configured}"
    try:
        check_url(endpoint.base_url, allowed=allowed_hosts(settings.judge_allowed_hosts))
    except AddressRefused as exc:
        return f"judge endpoint {name!r}: {exc}"
    return None


def endpoints_named(node) -> list[tuple[str, str]]:
    """(where, endpoint name) of every model grader in a spec (or any pydantic tree) that names an endpoint."""
    from pydantic import BaseModel

    from tuneforge.spec.graders import ModelGrader

    found: list[tuple[str, str]] = []

    def walk(value, where: str) -> None:
        if isinstance(value, ModelGrader) and value.endpoint is not None:
            found.append((f"{where}.endpoint".lstrip("."), value.endpoint))
        if isinstance(value, BaseModel):
            for field in type(value).model_fields:
                walk(getattr(value, field), f"{where}.{field}")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{where}[{index}]")

    walk(node, "")
    return found


def spec_endpoint_problem(spec, settings=None) -> tuple[str, str] | None:
    """(field, why) for the first judge endpoint a job spec names that its judges may not call, or None.
    Settings are read only when the spec names an endpoint (most specs do not)."""
    named = endpoints_named(spec)
    if not named:
        return None
    if settings is None:
        from tuneforge.settings import Settings

        settings = Settings.from_env()
    for where, name in named:
        if problem := judge_endpoint_problem(name, settings):
            return where, problem
    return None
