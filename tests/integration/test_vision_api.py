"""Vision jobs through the server with the official `openai` client: image chats and image-text pairs uploaded
with their images inside as data: URLs (an upload may not name files), a `vlm` job on tiny-llava and a `clip`
job on tiny-clip run to succeeded and register their models; a training file whose images are paths is refused
at upload, and an image file given to a supervised (text) job fails at admission."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ServerProcess
from PIL import Image

from tuneforge.data.images import png_data_url

openai = pytest.importorskip("openai")

TINY = {"adapter": {"rank": 4, "alpha": 8}, "dataset": {"max_seq_length": 256}}


@pytest.fixture
def server(tmp_path, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("the job flow is the same on PostgreSQL (test_server_jobs); one database keeps CI short")
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


def inline_images(source, target, rows: int):
    """The JSONL with each image path replaced by the image itself as a data: URL."""
    def inline(value):
        if isinstance(value, dict):
            return {k: (png_data_url(Image.open(source.parent / v)) if k in ("url", "image") and isinstance(v, str)
                        else inline(v)) for k, v in value.items()}
        return [inline(v) for v in value] if isinstance(value, list) else value

    records = [inline(json.loads(line)) for line in source.read_text().splitlines()[:rows]]
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def upload(client, path):
    with open(path, "rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    return client.files.wait_for_processing(file.id, poll_interval=0.1, max_wait_seconds=60)


def finished(client, job, server):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            assert job.status == "succeeded", f"{job.error}\n{server.log_text()[-3000:]}"
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job.id} still {job.status}\n{server.log_text()[-3000:]}")


def test_vlm_and_clip_jobs_run_through_the_api(server, shapes_dir, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["tenant-a"], max_retries=0, timeout=30)
    chats = upload(client, inline_images(shapes_dir / "chat.train.jsonl", tmp_path / "chats.jsonl", 24))
    held_out = upload(client, inline_images(shapes_dir / "chat.val.jsonl", tmp_path / "chats-val.jsonl", 8))
    pairs = upload(client, inline_images(shapes_dir / "pairs.train.jsonl", tmp_path / "pairs.jsonl", 24))
    files = (chats, held_out, pairs)
    assert all(f.status == "processed" for f in files), [f.status_details for f in files]

    vlm = client.fine_tuning.jobs.create(
        model="tiny-llava", training_file=chats.id, validation_file=held_out.id,
        method={"type": "vlm", "vlm": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 20}}},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 4},
                                         "evaluation": {"metrics": ["loss", "exact_match"], "max_new_tokens": 8}}})
    clip = client.fine_tuning.jobs.create(
        model="tiny-clip", training_file=pairs.id, method={"type": "clip"},
        extra_body={"tuneforge": TINY | {"training": {"max_steps": 2, "batch_size": 8}}})
    vlm, clip = finished(client, vlm, server), finished(client, clip, server)
    assert vlm.method.type == "vlm" and vlm.fine_tuned_model and clip.method.type == "clip" and clip.fine_tuned_model
    events = [e.data or {} for e in client.fine_tuning.jobs.list_events(vlm.id, limit=100).data]
    assert any(data.get("kind") == "dataset" and data.get("train_images") == 24 for data in events), events[:5]
    assert any("train_loss" in data for data in events)

    # An upload that names image files on the server is refused line by line; no job can use it.
    paths = tmp_path / "paths.jsonl"
    paths.write_text((shapes_dir / "chat.train.jsonl").read_text())
    refused = upload(client, paths)
    assert refused.status == "error" and "image_path_refused" in json.dumps(refused.to_dict())
    # Image chats are not text SFT data: admission fails the job and says what the file holds.
    wrong = client.fine_tuning.jobs.create(model="tiny-llama", training_file=chats.id)
    deadline = time.monotonic() + 60
    while (wrong := client.fine_tuning.jobs.retrieve(wrong.id)).status not in ("failed", "succeeded"):
        assert time.monotonic() < deadline, wrong.status
        time.sleep(0.2)
    assert wrong.status == "failed" and "holds image_chat records" in wrong.error.message
