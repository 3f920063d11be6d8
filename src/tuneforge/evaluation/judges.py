"""LLM judges behind one interface: a model tuneforge loads locally, or an OpenAI-compatible endpoint.

Graders (`score_model`, `label_model`), pairwise and single-answer judging all call `Judge.complete`, so
they do not care where the judge runs. An endpoint is one the operator configured by name in
TUNEFORGE_JUDGE_ENDPOINTS; a request names it and never carries a URL or a key. Its host must resolve to
public addresses (tuneforge/egress.py), checked when the judge is built and again on every connection.
Importing this module does not import torch: only a local judge loads it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import tuneforge.egress as egress
from tuneforge.settings import JudgeEndpoint, Settings

Conversation = list[dict[str, str]]
ROLES = ("system", "developer", "user", "assistant")
MAX_BACKOFF_SECONDS = 30.0


class JudgeError(RuntimeError):
    """A judge that cannot be built or cannot answer: unknown endpoint, missing key, a server that fails."""


class Judge(Protocol):
    def complete(self, conversations: list[list[dict[str, str]]], *, max_tokens: int, temperature: float,
                 seed: int | None) -> list[str]:
        """One reply per conversation, in order. temperature 0 is greedy decoding."""
        ...


def judge_for(model: str, endpoint: str | None = None, *, settings: Settings | None = None) -> Judge:
    """The judge a grader or a judging run names.

    endpoint None: `model` runs locally, a built-in base model name or a local model directory (loaded
    once per process and kept). Otherwise `model` is the model name the endpoint serves, and `endpoint`
    one of the names the operator configured (settings.judge_endpoints, from TUNEFORGE_JUDGE_ENDPOINTS).
    """
    if endpoint is None:
        return local_judge(model)
    settings = settings or Settings.from_env()
    if problem := egress.judge_endpoint_problem(endpoint, settings):
        raise JudgeError(problem)
    return EndpointJudge(settings.judge_endpoints[endpoint], model,
                         allowed_hosts=egress.allowed_hosts(settings.judge_allowed_hosts))


def check_conversations(conversations: list[list[dict[str, str]]]) -> None:
    """Refuse a malformed conversation before any model runs, naming which one and which message."""
    if not isinstance(conversations, list):
        raise JudgeError(f"conversations must be a list of conversations, found {type(conversations).__name__}")
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation:
            raise JudgeError(f"conversation {i}: expected a non-empty list of messages")
        for j, message in enumerate(conversation):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise JudgeError(f"conversation {i}, message {j}: expected {{\"role\": one of {', '.join(ROLES)}, "
                                 f"\"content\": a string}}, found {str(message)[:80]}")


def _check_sampling(max_tokens: int, temperature: float) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise JudgeError(f"max_tokens must be a positive integer, found {max_tokens!r}")
    if not 0.0 <= temperature <= 2.0:
        raise JudgeError(f"temperature must be between 0 and 2, found {temperature!r}")


# ---- a judge model loaded in this process ------------------------------------------------------------

_LOCAL_JUDGES: dict[str, LocalJudge] = {}
_LOCAL_LOCK = threading.Lock()


def local_judge(model: str) -> LocalJudge:
    """The local judge for a built-in model name or a model directory, loaded on first use and kept."""
    from tuneforge.engine.base_models import ModelNotFound, resolve_base_model

    try:
        model_dir = resolve_base_model(model)
    except ModelNotFound as exc:
        raise JudgeError(f"judge model {model!r}: {exc}") from None
    with _LOCAL_LOCK:
        judge = _LOCAL_JUDGES.get(str(model_dir))
        if judge is None:
            judge = _LOCAL_JUDGES[str(model_dir)] = LocalJudge(model_dir)
        return judge


def clear_local_judges() -> None:
    """Forget the loaded judges (their memory is freed once nothing else holds them)."""
    with _LOCAL_LOCK:
        _LOCAL_JUDGES.clear()


class LocalJudge:
    """A causal LM on this machine: each conversation rendered with its tokenizer's chat template and
    answered in left-padded batches (greedy at temperature 0, seeded sampling otherwise)."""

    def __init__(self, model_dir: str | Path, *, batch_size: int = 8, device=None):
        from tuneforge.data.templating import CHATML_TEMPLATE
        from tuneforge.engine.model_loading import load_base_model, load_tokenizer
        from tuneforge.engine.precision import resolve_device, resolve_precision
        from tuneforge.spec.job import ModelSpec

        self.model_dir = Path(model_dir)
        self.batch_size = batch_size
        self.precision = resolve_precision("auto", device or resolve_device())
        self.tokenizer = load_tokenizer(self.model_dir)
        if not self.tokenizer.chat_template:
            self.tokenizer.chat_template = CHATML_TEMPLATE
        self.model = load_base_model(self.model_dir, ModelSpec(base_model=str(self.model_dir)), self.precision,
                                     full_finetune=False)
        self.model.eval()
        self._lock = threading.Lock()  # generation flips padding sides and train/eval modes

    def render(self, conversation: Conversation) -> str:
        """The prompt text the model continues: its chat template with the assistant turn opened."""
        # A developer message is OpenAI's name for a system message.
        messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                    for m in conversation]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def complete(self, conversations: list[list[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        check_conversations(conversations)
        _check_sampling(max_tokens, temperature)
        if not conversations:
            return []
        prompts = [self.render(conversation) for conversation in conversations]
        with self._lock, self.precision.autocast():
            if temperature == 0.0:
                from tuneforge.evaluation.generation import generate

                return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_tokens,
                                batch_size=self.batch_size, device=self.precision.device)
            return self._sample(prompts, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def _sample(self, prompts: list[str], *, max_tokens: int, temperature: float, seed: int | None) -> list[str]:
        """Plain temperature sampling (no top-k / top-p cut, as OpenAI's endpoints do by default), seeded
        without disturbing the caller's random state. Greedy decoding is generation.generate's job."""
        import torch

        tokenizer, device = self.tokenizer, self.precision.device
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        outputs: list[str] = []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(prompts), self.batch_size):
                    batch = tokenizer(prompts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                      add_special_tokens=False).to(device)
                    generated = self.model.generate(
                        **batch, max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                        use_cache=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    )
                    outputs.extend(tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :],
                                                          skip_special_tokens=True))
        finally:
            tokenizer.padding_side = side
        return outputs


# ---- a judge behind an OpenAI-compatible endpoint ----------------------------------------------------


class EndpointJudge:
    """POST {base_url}/chat/completions for each conversation, a few at a time, retrying 429, 5xx and
    connection failures with exponential backoff (or the server's Retry-After)."""

    backoff_seconds = 0.5  # the first retry's wait; doubled each time, at most MAX_BACKOFF_SECONDS

    def __init__(self, endpoint: JudgeEndpoint, model: str, *, allowed_hosts: frozenset[str] = frozenset()):
        if not model or not model.strip():
            raise JudgeError(f"judge endpoint {endpoint.name!r}: name the model it should run")
        self.endpoint, self.model, self.allowed_hosts = endpoint, model, allowed_hosts
        self._headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env, "")
            if not key:
                raise JudgeError(f"judge endpoint {endpoint.name!r}: its API key is read from the environment "
                                 f"variable {endpoint.api_key_env}, which is not set")
            self._headers["Authorization"] = f"Bearer {key}"

    @property
    def url(self) -> str:
        return f"{self.endpoint.base_url}/chat/completions"

    def complete(self, conversations: list[list[dict[str, str]]], *, max_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        import httpx

        check_conversations(conversations)
        _check_sampling(max_tokens, temperature)
        bodies = []
        for conversation in conversations:
            body = {"model": self.model, "messages": conversation, "max_tokens": max_tokens, "temperature": temperature}
            if seed is not None:
                body["seed"] = seed
            bodies.append(body)
        timeout = httpx.Timeout(self.endpoint.timeout_seconds, connect=min(10.0, self.endpoint.timeout_seconds))
        # Every connection re-resolves and re-checks the host (DNS rebinding); no redirects are followed.
        with httpx.Client(timeout=timeout, headers=self._headers, transport=egress.guarded_transport(self.allowed_hosts),
                          follow_redirects=False) as client:
            workers = min(self.endpoint.max_concurrency, len(bodies))
            if workers <= 1:
                return [self._post(client, body) for body in bodies]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(lambda body: self._post(client, body), bodies))

    def _post(self, client, body: dict) -> str:
        import httpx

        name, attempts = self.endpoint.name, self.endpoint.max_retries + 1
        for attempt in range(attempts):
            wait = min(MAX_BACKOFF_SECONDS, self.backoff_seconds * 2**attempt)
            try:
                response = client.post(self.url, json=body)
            except httpx.TransportError as exc:  # connection refused, reset, timed out
                if isinstance(exc.__cause__, egress.AddressRefused) or "TUNEFORGE_JUDGE_ALLOWED_HOSTS" in str(exc):
                    raise JudgeError(f"judge endpoint {name!r}: {exc}") from None  # refused, never retried
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return self._reply(response)
                failure = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code != 429 and response.status_code < 500:
                    raise JudgeError(f"judge endpoint {name!r} refused the request ({failure})")
                wait = _retry_after(response, wait)
            if attempt + 1 < attempts:
                time.sleep(wait)
        raise JudgeError(f"judge endpoint {name!r} failed after {attempts} attempt(s); last: {failure}")

    def _reply(self, response) -> str:
        try:
            message = response.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.endpoint.name!r} answered without choices[0].message: "
                             f"{response.text[:300]}") from None
        return message.get("content") or ""  # null content (a refusal, a tool call) is no verdict


def _retry_after(response, default: float) -> float:
    """The server's Retry-After in seconds when it gives one (capped), else the backoff."""
    try:
        return min(MAX_BACKOFF_SECONDS, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return default
