"""Judges: a local model built from a config, and an OpenAI-compatible endpoint served by a real HTTP server."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneforge.evaluation.judges import EndpointJudge, JudgeError, LocalJudge, clear_local_judges, judge_for
from tuneforge.settings import Settings, SettingsError

CONVERSATIONS = [
    [{"role": "system", "content": "You are a judge."}, {"role": "user", "content": f"Question {i}: is {i} even?"}]
    for i in range(5)
]


# ---- local -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    clear_local_judges()
    judge = judge_for(str(tiny_model_dir), None)
    yield judge
    clear_local_judges()


def test_local_judge_answers_each_conversation_and_is_cached(local, tiny_model_dir):
    assert isinstance(local, LocalJudge)
    assert judge_for(str(tiny_model_dir)) is local  # loaded once per process
    replies = local.complete(CONVERSATIONS, max_tokens=6, temperature=0.0, seed=None)
    assert len(replies) == len(CONVERSATIONS) and all(isinstance(r, str) for r in replies)
    assert local.complete([], max_tokens=6, temperature=0.0, seed=None) == []


def test_local_judge_batches_give_the_answers_one_at_a_time_gives(local):
    from tuneforge.evaluation.generation import generate

    local.batch_size = 2  # 5 conversations: batches of 2, 2, 1
    try:
        batched = local.complete(CONVERSATIONS, max_tokens=6, temperature=0.0, seed=None)
    finally:
        local.batch_size = 8
    # The same prompts, rendered by the chat template with the assistant turn opened, one at a time.
    prompts = [local.render(c) for c in CONVERSATIONS]
    assert prompts[0].endswith("<|im_start|>assistant\n") and "Question 0" in prompts[0]
    alone = [generate(local.model, local.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


def test_local_judge_samples_reproducibly_with_a_seed(local):
    import torch

    state = torch.random.get_rng_state()
    first = local.complete(CONVERSATIONS[:3], max_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert local.complete(CONVERSATIONS[:3], max_tokens=8, temperature=1.0, seed=7) == first
    others = [local.complete(CONVERSATIONS[:3], max_tokens=8, temperature=1.0, seed=s) for s in (8, 9)]
    assert any(o != first for o in others)  # an untrained byte-level model samples noise: seeds differ


def test_local_judge_refuses_bad_input(local):
    with pytest.raises(JudgeError, match="conversation 1, message 0"):
        local.complete([CONVERSATIONS[0], [{"role": "robot", "content": "hi"}]], max_tokens=4, temperature=0.0, seed=None)
    with pytest.raises(JudgeError, match="max_tokens"):
        local.complete(CONVERSATIONS, max_tokens=0, temperature=0.0, seed=None)


def test_unknown_local_model_is_a_judge_error(tmp_path):
    with pytest.raises(JudgeError, match="nothing is downloaded"):
        judge_for("some-org/some-hub-model", None)


# ---- endpoint ----------------------------------------------------------------------------------------


class ChatServer:
    """A real HTTP server answering /v1/chat/completions. Each request is recorded; `script` holds the
    (status, headers, body, delay) answers to give first, after which it echoes the last user message."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict, str | None, float]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, headers, text, delay = server.script.pop(0) if server.script else (200, {}, None, 0.0)
                time.sleep(delay)
                if text is None:
                    content = "echo: " + body["messages"][-1]["content"]
                    text = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                       "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": content}}]})
                data = text.encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture
def endpoints(server, monkeypatch):
    """TUNEFORGE_JUDGE_ENDPOINTS naming the test server twice: with a key, and with a short timeout."""
    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", json.dumps({
        "grader-box": {"base_url": server.base_url, "api_key_env": "GRADER_BOX_KEY"},
        "impatient": {"base_url": server.base_url, "timeout_seconds": 0.3, "max_retries": 1},
    }))
    monkeypatch.setenv("GRADER_BOX_KEY", "sk-test-123")
    monkeypatch.setenv("TUNEFORGE_JUDGE_ALLOWED_HOSTS", "127.0.0.1")  # the test server is on loopback (see egress.py)
    return Settings.from_env()


def _fast(judge: EndpointJudge) -> EndpointJudge:
    judge.backoff_seconds = 0.01
    return judge


def test_endpoint_judge_sends_chat_completions(server, endpoints):
    judge = judge_for("judge-7b", "grader-box")
    assert isinstance(judge, EndpointJudge)
    replies = judge.complete(CONVERSATIONS, max_tokens=64, temperature=0.0, seed=42)
    # Several requests are in flight at once; the replies still come back in the conversations' order.
    assert replies == [f"echo: Question {i}: is {i} even?" for i in range(5)]
    assert len(server.requests) == 5
    bodies = sorted((r["body"] for r in server.requests), key=lambda b: b["messages"][-1]["content"])
    for i, body in enumerate(bodies):
        assert body == {"model": "judge-7b", "messages": CONVERSATIONS[i], "max_tokens": 64, "temperature": 0.0,
                        "seed": 42}
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sk-test-123"


def test_endpoint_without_key_or_seed_sends_neither(server, endpoints):
    judge = judge_for("judge-7b", "impatient", settings=endpoints)
    assert judge.complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.5, seed=None) == ["echo: Question 0: is 0 even?"]
    request = server.requests[0]
    assert "Authorization" not in request["headers"]
    assert "seed" not in request["body"] and request["body"]["temperature"] == 0.5


def test_endpoint_retries_rate_limits_and_server_errors(server, endpoints):
    server.script = [(429, {"Retry-After": "0"}, '{"error": "slow down"}', 0.0), (503, {}, "overloaded", 0.0)]
    judge = _fast(judge_for("judge-7b", "grader-box"))
    assert judge.complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.0, seed=1) == ["echo: Question 0: is 0 even?"]
    assert len(server.requests) == 3


def test_endpoint_gives_up_after_its_retries(server, endpoints):
    server.script = [(500, {}, "boom", 0.0)] * 10
    judge = _fast(judge_for("judge-7b", "grader-box"))
    with pytest.raises(JudgeError, match=r"'grader-box' failed after 5 attempt\(s\); last: HTTP 500: boom"):
        judge.complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.0, seed=1)
    assert len(server.requests) == 5  # the first try and max_retries (4) retries


def test_endpoint_client_errors_are_not_retried(server, endpoints):
    server.script = [(401, {}, '{"error": "bad key"}', 0.0)]
    judge = _fast(judge_for("judge-7b", "grader-box"))
    with pytest.raises(JudgeError, match=r"refused the request \(HTTP 401: .*bad key"):
        judge.complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.0, seed=1)
    assert len(server.requests) == 1


def test_endpoint_timeouts_are_retried_then_reported(server, endpoints):
    server.script = [(200, {}, None, 1.0), (200, {}, None, 1.0)]
    judge = _fast(judge_for("judge-7b", "impatient"))
    with pytest.raises(JudgeError, match=r"'impatient' failed after 2 attempt\(s\); last: ReadTimeout"):
        judge.complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.0, seed=1)


def test_endpoint_answer_without_choices_is_an_error(server, endpoints):
    server.script = [(200, {}, '{"object": "error"}', 0.0)]
    with pytest.raises(JudgeError, match=r"without choices\[0\].message"):
        judge_for("judge-7b", "grader-box").complete(CONVERSATIONS[:1], max_tokens=8, temperature=0.0, seed=1)


def test_unknown_endpoint_lists_the_configured_ones(endpoints):
    with pytest.raises(JudgeError, match="'elsewhere' is not configured; the configured endpoints are: grader-box, impatient"):
        judge_for("judge-7b", "elsewhere")
    with pytest.raises(JudgeError, match=r"TUNEFORGE_JUDGE_ENDPOINTS is empty"):
        judge_for("judge-7b", "elsewhere", settings=Settings.from_env(judge_endpoints={}))


def test_missing_key_names_the_variable_not_a_value(endpoints, monkeypatch):
    monkeypatch.delenv("GRADER_BOX_KEY")
    with pytest.raises(JudgeError, match="environment variable GRADER_BOX_KEY, which is not set"):
        judge_for("judge-7b", "grader-box")


def test_bad_endpoint_settings_are_refused(monkeypatch):
    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", '{"box": {"url": "http://127.0.0.1:1/v1"}}')
    with pytest.raises(SettingsError, match="endpoint 'box': unknown key"):
        Settings.from_env()
    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", '{"box": {"base_url": "file:///etc/passwd"}}')
    with pytest.raises(SettingsError, match="base_url must be an http"):
        Settings.from_env()
    monkeypatch.setenv("TUNEFORGE_JUDGE_ENDPOINTS", '{"box": ')
    with pytest.raises(SettingsError, match="invalid JSON"):
        Settings.from_env()


def test_judging_modules_do_not_import_torch():
    """Endpoint judges, judging and the human round trip run in processes without torch (the API's evals)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import tuneforge.evaluation.judges, tuneforge.evaluation.judging, tuneforge.evaluation.human\n"
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
