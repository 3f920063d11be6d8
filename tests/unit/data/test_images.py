"""Image datasets: OpenAI's vision chat format and image-text pairs are detected and validated with the same
line-level report as text (decoding, formats, byte and pixel limits, images per example); data: URLs and paths
inside the dataset's folder are read, http(s) URLs never are, and an upload (read with limits) may not name paths."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_jsonl
from tuneforge.data.formats import detect_format
from tuneforge.data.images import ImageError, ImageLimits, decode_image, image_problems, png_data_url
from tuneforge.data.loading import load_examples
from tuneforge.data.reader import InputLimits
from tuneforge.data.validation import validate_file


def image(colour=(200, 30, 30), size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def vision_chat(url: str, answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": answer}]}


def problems(report) -> dict[str, list[tuple[int, str]]]:
    found = report.to_dict()["problems"].items()
    return {kind: [(p["line"], p["field"]) for p in entry["first"]] for kind, entry in found}


def test_detects_image_chat_and_image_text_and_normalizes_to_processor_parts(tmp_path):
    assert detect_format(vision_chat("data:image/png;base64,AA")) == "image_chat"
    assert detect_format({"image": "a.png", "caption": "a red circle"}) == "image_text"
    text_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert detect_format(text_chat) == "chat"
    image(size=(4, 4)).save(tmp_path / "red.png")
    path = write_jsonl(tmp_path / "d.jsonl", [vision_chat("red.png")] * 2)
    examples, fmt = load_examples(path)
    assert fmt == "image_chat"
    parts = examples[0].record["messages"][0]["content"]
    assert parts == [{"type": "image", "image": "red.png"}, {"type": "text", "text": "What colour?"}]
    assert examples[0].record["messages"][1]["content"] == [{"type": "text", "text": "red"}]
    assert examples[0].as_messages()[0]["content"] == "What colour?"


def test_every_bad_image_is_reported_with_its_line_and_field(tmp_path):
    image().save(tmp_path / "ok.png")
    (tmp_path / "not-an-image.png").write_bytes(b"hello")
    (tmp_path / "picture.bmp").write_bytes(encoded(image(), "BMP"))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    image().save(outside)
    (tmp_path / "link.png").symlink_to(outside)
    rows = [vision_chat(png_data_url(image())) for _ in range(10)] + [
        vision_chat("ok.png"),                                            # 11: fine
        vision_chat("https://example.com/cat.png"),                       # 12: never fetched
        vision_chat("../" + outside.name),                                # 13: outside the folder
        vision_chat("link.png"),                                          # 14: a link out of it
        vision_chat("missing.png"),                                       # 15
        vision_chat("not-an-image.png"),                                  # 16
        vision_chat("picture.bmp"),                                       # 17: not an allowed format
        vision_chat("data:image/png;base64,@@@@"),                        # 18: not base64
        vision_chat("data:text/plain;base64,aGk="),                       # 19: not an image
        {"messages": [{"role": "user", "content": "hi"},                  # 20: an image in the reply
                      {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "ok.png"}},
                                                        {"type": "text", "text": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},  # 21
                      {"role": "assistant", "content": "x"}]},
    ]
    report = validate_file(write_jsonl(tmp_path / "data.jsonl", rows))
    assert report.format == "image_chat" and report.examples == 11 and not report.valid
    found = problems(report)
    assert found["image_url_refused"] == [(12, "messages[0].content[0].image_url.url")]
    assert found["image_path_outside"] == [(13, "messages[0].content[0].image_url.url"),
                                           (14, "messages[0].content[0].image_url.url")]
    assert found["image_not_found"] == [(15, "messages[0].content[0].image_url.url")]
    assert found["image_undecodable"] == [(16, "messages[0].content[0].image_url.url")]
    assert [line for line, _ in found["image_format"]] == [17, 19]
    assert found["bad_data_url"] == [(18, "messages[0].content[0].image_url.url")]
    assert found["misplaced_image"] == [(20, "messages[1].content[0]")]
    assert found["unknown_part"] == [(21, "messages[0].content[0].type")]
    assert report.stats["images"] == 11 and report.stats["images_per_example_max"] == 1


def test_an_upload_may_hold_data_urls_only(tmp_path):
    image().save(tmp_path / "ok.png")
    rows = [vision_chat(png_data_url(image((i, 0, 0)))) for i in range(10)] + [vision_chat("ok.png")]
    path = write_jsonl(tmp_path / "upload.jsonl", rows)
    assert validate_file(path).valid  # the user's own file, from the CLI: the path is read
    report = validate_file(path, limits=InputLimits())  # an upload: no path is ever opened
    assert problems(report) == {"image_path_refused": [(11, "messages[0].content[0].image_url.url")]}


def test_sizes_formats_and_counts_have_limits():
    limits = ImageLimits(max_bytes=10_000, max_pixels=64 * 64, max_images_per_example=2)
    with pytest.raises(ImageError) as pixels:
        decode_image(encoded(image(size=(65, 64)), "PNG"), limits)
    assert pixels.value.kind == "image_too_many_pixels"
    noisy = Image.frombytes("RGB", (60, 60), bytes(range(256)) * (60 * 60 * 3 // 256) + bytes(60 * 60 * 3 % 256))
    with pytest.raises(ImageError) as large:
        decode_image(encoded(noisy, "BMP"), limits)  # 10.8 KB
    assert large.value.kind == "image_too_large"
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(encoded(image(), fmt), limits)[1].format == fmt.lower()
    frames = [image((255, 0, 0)), image((0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    first, info = decode_image(gif.getvalue(), limits)
    assert info.format == "gif" and first.mode == "RGB" and first.getpixel((0, 0))[0] > 200  # the first frame
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": png_data_url(image())}] * 3},
                           {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}
    found = image_problems(record, "image_chat", file="f", line=7, base_dir=None, limits=limits)
    assert [(p.kind, p.line) for p in found] == [("too_many_images", 7)]


def test_image_text_pairs_and_the_validate_command(tmp_path):
    image().save(tmp_path / "red.png")
    rows = [{"image": "red.png", "text": f"a red square {i}"} for i in range(10)] + [{"image": {"url": "red.png"},
                                                                                       "caption": "a red one"},
                                                                                      {"image": "red.png", "text": ""}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    done = subprocess.run([sys.executable, "-m", "tuneforge.cli", "data", "validate", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "image_text" and report["examples"] == 11
    assert [p["line"] for p in report["problems"]["empty_content"]["first"]] == [12]
    assert report["stats"]["images"] == 11
