"""Shared fixtures: an isolated TUNEFORGE_HOME per test, a tiny model, small datasets, job directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATA = REPO / "examples" / "json-extraction"


@pytest.fixture(autouse=True)
def tuneforge_home(tmp_path_factory, monkeypatch) -> Path:
    home = tmp_path_factory.mktemp("tuneforge-home")
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tuneforge.engine.tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    from tuneforge.engine.vision.tiny import build_tiny_llava_dir

    return build_tiny_llava_dir(tmp_path_factory.mktemp("tiny-llava") / "model")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tuneforge.engine.vision.tiny import build_tiny_clip_dir

    return build_tiny_clip_dir(tmp_path_factory.mktemp("tiny-clip") / "model")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """The coloured-shapes images and their JSONL files (examples/vision/generate.py), generated for the session."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_shapes", REPO / "examples" / "vision" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("shapes")
    module.generate(out)
    return out


@pytest.fixture(scope="session")
def byte_tokenizer():
    from tuneforge.engine.tiny_model import build_byte_tokenizer

    return build_byte_tokenizer()


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def random_lora_adapter(base_dir: Path, out: Path, seed: int):
    """A LoRA adapter (r 4, q/v) on base_dir whose B matrices are not zero, so it changes what the model answers;
    saved to out, and returned (the PEFT model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B starts at zero: make the adapter change something
    model.save_pretrained(out)
    return model


def make_job_dir(tmp_path: Path, model_dir: Path, **sections) -> Path:
    """A job directory with a spec.json for the tiny model on the example data, sections overriding."""
    from tuneforge.spec import validate_job_spec
    from tuneforge.spec.jobdir import write_spec

    data = {
        "model": {"base_model": str(model_dir)},
        "dataset": {
            "path": str(EXAMPLE_DATA / "train.jsonl"),
            "validation_path": str(EXAMPLE_DATA / "val.jsonl"),
            "max_seq_length": 512,
        },
        "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {"learning_rate": 3e-3, "per_device_batch_size": 8, "max_steps": 12, "seed": 0},
        "evaluation": {"metrics": ["loss", "perplexity"], "max_eval_examples": 16},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    job_dir = tmp_path / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_spec(job_dir, validate_job_spec(data))
    return job_dir


# ---- control plane: databases and a real server process ----------------------------------------

import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
POSTGRES_HOWTO = (
    "PostgreSQL is not reachable at {url}; these tests need it. Start a local server with trust auth "
    "(e.g. `pg_ctlcluster 15 main start`) or point TUNEFORGE_TEST_POSTGRES_URL at one. "
    "Set TUNEFORGE_REQUIRE_POSTGRES=1 to make this a failure instead of a skip (CI does)."
)


def _postgres_admin_engine():
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _postgres_or_skip():
    from sqlalchemy import text

    engine = _postgres_admin_engine()
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "not here"
        engine.dispose()
        message = POSTGRES_HOWTO.format(url=POSTGRES_ADMIN_URL) + f" ({type(exc).__name__})"
        if os.environ.get("TUNEFORGE_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return engine


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """`slow_on_postgresql`: an end-to-end test whose PostgreSQL variant runs with -m slow. The SQL it issues runs
    on both databases in the database-level tests, so the default suite (CI's 30 minutes) runs its flow once."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("slow_on_postgresql") and params.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty database of each kind (a new PostgreSQL database per test, dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tuneforge.db'}"
        return
    from sqlalchemy import text

    engine = _postgres_or_skip()
    name = f"tuneforge_test_{os.getpid()}_{secrets.token_hex(4)}"
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAST_LEASES = {
    "TUNEFORGE_LEASE_SECONDS": "6",
    "TUNEFORGE_HEARTBEAT_SECONDS": "0.5",
    "TUNEFORGE_POLL_SECONDS": "0.2",
    "TUNEFORGE_STOP_GRACE_SECONDS": "30",
}


class ServerProcess:
    """`tuneforge server` (and extra `tuneforge worker` processes) on a free loopback port."""

    def __init__(self, home: Path, database_url: str, *, worker: bool = True):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **FAST_LEASES, "TUNEFORGE_HOME": str(home), "TUNEFORGE_DATABASE_URL": database_url}
        self.keys = {tenant: self.cli("keys", "create", "--tenant", tenant).strip() for tenant in ("tenant-a", "tenant-b")}
        self.log = open(home / "server.log", "ab")
        args = [sys.executable, "-m", "tuneforge.cli", "server", "--port", str(self.port), "--cpu-slots", "1"]
        self.process = subprocess.Popen(args + ([] if worker else ["--no-worker"]), env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.workers: list[subprocess.Popen] = []
        self._wait_healthy()

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def start_worker(self) -> subprocess.Popen:
        worker = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "worker", "--cpu-slots", "1"], env=self.env,
                                  stdout=self.log, stderr=subprocess.STDOUT)
        self.workers.append(worker)
        return worker

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tuneforge server exited with {self.process.returncode}: {self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("tuneforge server did not become healthy: " + self.log_text()[-3000:])

    def log_text(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in [*self.workers, self.process]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.process]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.log.close()


def post_file(http, path: Path, name: str | None = None) -> dict:
    """Upload a fine-tune file through the API; the answer comes at once, status "uploaded"."""
    with open(path, "rb") as handle:
        response = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name or path.name, handle)})
    assert response.status_code == 200, response.text
    return response.json()


def wait_validated(http, file_id: str, timeout: float = 60.0, validate=None) -> dict:
    """The file once the scheduler has validated it (processed or error). `validate` runs the upload
    validator here, for an app served without a scheduler."""
    deadline = time.monotonic() + timeout
    while True:
        file = http.get(f"/v1/files/{file_id}").json()
        if file["status"] != "uploaded":
            return file
        assert time.monotonic() < deadline, f"{file_id} still uploaded after {timeout} s"
        validate() if validate else time.sleep(0.1)


# ---- storage: moto's S3-compatible server, in this process, on a free port (tests of registry/storage) ----

class S3Server:
    """A running moto S3 server: its endpoint, the AWS_* variables a client (or a subprocess) needs, buckets."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"tf-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server_process():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_server(s3_server_process, monkeypatch) -> S3Server:
    """The moto server, with this test's environment holding its credentials."""
    for name, value in s3_server_process.env.items():
        monkeypatch.setenv(name, value)
    return s3_server_process
