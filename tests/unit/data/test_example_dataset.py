import importlib.util

from conftest import EXAMPLE_DATA


def test_committed_example_data_is_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", EXAMPLE_DATA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE_DATA / name).read_bytes()
    train = {line for line in (EXAMPLE_DATA / "train.jsonl").read_text().splitlines()}
    val = (EXAMPLE_DATA / "val.jsonl").read_text().splitlines()
    assert sum(line in train for line in val) <= 2  # held-out examples are (almost all) new sentences
