"""The vision example (examples/vision): the committed files are what its generator writes, every answer is a
colour that its image shows, and the CLIP validation pairs name each colour-shape pair once."""

import importlib.util
import json
from pathlib import Path

from PIL import Image

TASK = Path(__file__).resolve().parents[3] / "examples" / "vision"


def test_committed_files_are_the_generators_and_the_answers_are_in_the_images(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_shapes", TASK / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    def data(root):
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".png", ".jsonl"))

    written = data(tmp_path)
    assert written == data(TASK) and len(written) == 4 + module.TRAIN + module.VAL
    assert all((tmp_path / p).read_bytes() == (TASK / p).read_bytes() for p in written)
    chats = [json.loads(line) for name in ("chat.train.jsonl", "chat.val.jsonl")
             for line in (TASK / name).read_text().splitlines()]
    assert len(chats) == module.TRAIN + module.VAL
    for record in chats:
        url = record["messages"][0]["content"][0]["image_url"]["url"]
        colour = record["messages"][1]["content"]
        pixels = Image.open(TASK / url).convert("RGB").getdata()
        assert module.COLOURS[colour] in set(pixels)  # the named colour is drawn, the others are not
        assert not {rgb for name, rgb in module.COLOURS.items() if name != colour} & set(pixels)
    captions = [json.loads(line)["text"] for line in (TASK / "pairs.val.jsonl").read_text().splitlines()]
    assert len(captions) == len(set(captions)) == len(module.COLOURS) * len(module.SHAPES)
