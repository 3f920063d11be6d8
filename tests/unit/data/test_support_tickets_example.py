"""The support-tickets example (the quality table's classification task): the committed files are what its
generator writes, every answer is a team letter, and the validation messages word problems the training set
never does, so the table measures generalization rather than recall."""

import importlib.util
import json
from pathlib import Path

TASK = Path(__file__).resolve().parents[3] / "examples" / "support-tickets"


def test_committed_files_are_the_generators_and_validation_is_held_out(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_support_tickets", TASK / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASK / name).read_bytes()
    train, val = ([json.loads(line) for line in (TASK / name).read_text().splitlines()] for name in ("train.jsonl", "val.jsonl"))
    assert (len(train), len(val)) == (320, 64)
    answers = [r["messages"][-1]["content"] for r in train + val]
    assert set(answers) == set("ABCD")
    issues = {team: phrases for team, phrases in module.ISSUES.items()}
    held_out = {p for phrases in issues.values() for p in phrases[-module.HELD_OUT:]}
    train_text = " ".join(r["messages"][1]["content"].lower() for r in train)
    assert not [p for p in held_out if p.lower() in train_text]
    for record in val:  # each validation message states one held-out problem of its own team
        text, team = record["messages"][1]["content"].lower(), record["messages"][-1]["content"]
        assert [p for p in issues[team][-module.HELD_OUT:] if p.lower() in text]
