"""SSRF: a judge endpoint whose host resolves to a private, loopback, link-local or metadata address is
refused when a job naming it is submitted, when the judge is built, and at connection time (a host that
rebinds from a public address to a private one between the check and the call is still refused); an
operator's TUNEFORGE_JUDGE_ALLOWED_HOSTS lets a host on its own network through."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tuneforge.egress as egress
from tuneforge.settings import Settings

REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
           "100.64.0.1", "100.100.100.200", "224.0.0.1", "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1",
           "::ffff:169.254.169.254", "fc00::1", "::"]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", REFUSED)
def test_private_loopback_link_local_and_metadata_addresses_are_refused(address):
    assert egress.address_problem(address) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert egress.address_problem(address) is None


class Chat:
    """A tiny OpenAI-compatible chat server on loopback that counts the requests it gets."""

    def __init__(self):
        chat = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                chat.requests += 1
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "8"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def chat():
    server = Chat()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def settings_for(monkeypatch, base_url: str, allowed: str = "") -> Settings:
    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", json.dumps({"box": {"base_url": base_url, "max_retries": 0}}))
    monkeypatch.setenv("TUNEFORGE_JUDGE_ALLOWED_HOSTS", allowed)
    return Settings.from_env()


def judged_spec():
    from tuneforge.spec import validate_job_spec

    grader = {"type": "score_model", "name": "judge", "model": "judge-7b", "endpoint": "box",
              "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}]}
    return validate_job_spec({"model": {"base_model": "tiny-llama"}, "dataset": {"path": "file-x"},
                              "evaluation": {"graders": [grader]}})


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:{port}/v1", "http://169.254.169.254/latest",
                                      "http://[::1]:{port}/v1", "http://localhost:{port}/v1"])
def test_a_job_naming_a_private_endpoint_is_refused_at_submission(monkeypatch, chat, base_url):
    from tuneforge.scheduler.submission import check_submission

    settings_for(monkeypatch, base_url.format(port=chat.port))
    problem = check_submission(judged_spec(), []).problem
    assert problem is not None and problem.code == "judge_endpoint_refused"
    assert problem.param == "tuneforge.evaluation.graders[0].endpoint"
    assert "judge endpoint 'box'" in problem.message and "TUNEFORGE_JUDGE_ALLOWED_HOSTS" in problem.message


def test_an_unknown_endpoint_is_refused_and_an_allowed_host_passes_at_submission(monkeypatch, chat):
    from tuneforge.scheduler.submission import check_submission

    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", "{}")
    assert "not configured" in check_submission(judged_spec(), []).problem.message
    settings_for(monkeypatch, f"http://127.0.0.1:{chat.port}/v1", allowed="127.0.0.1")
    assert check_submission(judged_spec(), []).problem is None


def test_the_judge_is_refused_when_built_and_the_server_gets_no_request(monkeypatch, chat):
    from tuneforge.evaluation.judges import JudgeError, judge_for

    settings = settings_for(monkeypatch, f"http://127.0.0.1:{chat.port}/v1")
    with pytest.raises(JudgeError, match="resolves to 127.0.0.1, a loopback address"):
        judge_for("judge-7b", "box", settings=settings)
    assert chat.requests == 0


def test_dns_rebinding_is_refused_at_connection_time(monkeypatch, chat):
    """judge.rebind.test answers a public address when the judge is built, then loopback: the address
    checked at connection time is the one connected to, so the call is refused and nothing is sent."""
    from tuneforge.evaluation.judges import JudgeError, judge_for

    answers = iter([["93.184.216.34"]])
    monkeypatch.setattr(egress, "resolve", lambda host, port: next(answers, ["127.0.0.1"]))
    settings = settings_for(monkeypatch, f"http://judge.rebind.test:{chat.port}/v1")
    judge = judge_for("judge-7b", "box", settings=settings)  # the first answer: public, accepted
    with pytest.raises(JudgeError, match="judge.rebind.test.*resolves to 127.0.0.1"):
        judge.complete([[{"role": "user", "content": "2+2?"}]], max_tokens=4)
    assert chat.requests == 0


def test_an_allowed_host_is_connected_at_the_address_that_was_checked(monkeypatch, chat):
    """With the host allowed, the guarded connection goes to the resolved address (the host name itself
    exists in no DNS), and the judge answers."""
    from tuneforge.evaluation.judges import judge_for

    monkeypatch.setattr(egress, "resolve", lambda host, port: ["127.0.0.1"])
    settings = settings_for(monkeypatch, f"http://judge.internal.test:{chat.port}/v1", allowed="judge.internal.test")
    assert judge_for("judge-7b", "box", settings=settings).complete(
        [[{"role": "user", "content": "2+2?"}]], max_tokens=4) == ["8"]
    assert chat.requests == 1
