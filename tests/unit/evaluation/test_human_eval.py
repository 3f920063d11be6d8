"""The human-evaluation round trip: blinded export, annotators' verdicts back in, win rates, kappa, preference pairs."""

import csv
import json

import pytest

from tuneforge.data.formats import validate_record
from tuneforge.data.problems import DataError
from tuneforge.evaluation.human import (
    SideBySideKey,
    export_side_by_side,
    import_judgements,
    preference_pairs,
    write_csv,
    write_jsonl,
)

TOPICS = ["rain", "tides", "eclipses", "magnets", "rainbows", "volcanoes"]
ITEMS = [{"prompt": f"Explain {topic} to a child."} for topic in TOPICS]
OUTPUTS = {
    "finetuned-xyz": [f"A careful answer about {topic}." for topic in TOPICS],
    "base-abc": [f"{topic} happen sometimes." for topic in TOPICS],
}


def exported(seed=3):
    return export_side_by_side(ITEMS, OUTPUTS, seed=seed)


def careful_side(row):
    return "left" if row["left"].startswith("A careful") else "right"


def test_export_is_shuffled_balanced_and_blind(tmp_path):
    rows, key = exported()
    assert [row["row_id"] for row in rows] == [f"r{i:04d}" for i in range(1, 7)]
    assert set(rows[0]) == {"row_id", "prompt", "left", "right"}
    # Blind: neither model's name is anywhere in what annotators get.
    jsonl, table = write_jsonl(tmp_path / "rows.jsonl", rows), write_csv(tmp_path / "rows.csv", rows)
    for text in (json.dumps(rows), jsonl.read_text(), table.read_text()):
        assert "finetuned-xyz" not in text and "base-abc" not in text
    # Shuffled, and each model on the left in half of the rows.
    items = [key.rows[row["row_id"]]["item"] for row in rows]
    assert sorted(items) == list(range(6)) and items != list(range(6))
    assert sum(key.rows[r]["left"] == "finetuned-xyz" for r in key.rows) == 3
    # The key un-blinds every row.
    for row in rows:
        entry = key.rows[row["row_id"]]
        assert row["prompt"] == ITEMS[entry["item"]]["prompt"]
        assert row["left"] == OUTPUTS[entry["left"]][entry["item"]] and row["right"] == OUTPUTS[entry["right"]][entry["item"]]
    # Reproducible from the seed; another seed, another order; the key survives JSON (the server stores it).
    assert exported() == (rows, key)
    assert exported(seed=4)[0] != rows
    assert SideBySideKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    with pytest.raises(ValueError, match="compares two models"):
        export_side_by_side(ITEMS, {"only": OUTPUTS["base-abc"]}, seed=0)


def test_round_trip_through_a_csv_annotators_filled_in(tmp_path):
    rows, key = exported()
    path = write_csv(tmp_path / "to-annotate.csv", rows)
    with open(path, newline="", encoding="utf-8") as handle:
        blank = list(csv.DictReader(handle))
    filled = []
    for i, row in enumerate(blank):
        filled.append({**row, "annotator": "ann", "verdict": careful_side(row).upper()})  # any case is fine
        filled.append({**row, "annotator": "ben", "verdict": "tie" if i == 0 else careful_side(row)})
    filled.append({**blank[1], "annotator": "", "verdict": ""})  # a row left unjudged
    back = tmp_path / "judged.csv"
    with open(back, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(blank[0]))
        writer.writeheader()
        writer.writerows(filled)

    report = import_judgements(back, key)
    assert report.judgements == 12 and report.skipped == 1 and report.annotators == ["ann", "ben"]
    finetuned, base = report.per_model["finetuned-xyz"], report.per_model["base-abc"]
    assert (finetuned.wins, finetuned.ties, finetuned.losses) == (11, 1, 0)
    assert (base.wins, base.ties, base.losses) == (0, 1, 11)
    assert finetuned.win.low < 11 / 12 < finetuned.win.high
    # By row: the row where ann chose the fine-tuned model and ben a tie has no majority, so it is a tie.
    assert (report.by_row["finetuned-xyz"].wins, report.by_row["finetuned-xyz"].ties) == (5, 1)
    assert report.agreement.method == "cohen" and report.agreement.rows == 6
    assert report.to_dict()["per_model"]["finetuned-xyz"]["wins"] == 11

    pairs = preference_pairs(report, ITEMS, OUTPUTS)
    tied_item = key.rows[blank[0]["row_id"]]["item"]
    assert [p["prompt"] for p in pairs] == [ITEMS[i]["prompt"] for i in range(6) if i != tied_item]
    assert all(p["chosen"].startswith("A careful") and not p["rejected"].startswith("A careful") for p in pairs)
    assert all(validate_record(p, "preference", file="pairs", line=1) == [] for p in pairs)


def test_round_trip_through_jsonl_and_rows(tmp_path):
    rows, key = exported()
    judged = [{"row_id": row["row_id"], "annotator": "cy", "verdict": careful_side(row)} for row in rows]
    write_jsonl(tmp_path / "judged.jsonl", judged)
    from_file = import_judgements(tmp_path / "judged.jsonl", key.to_dict())
    from_rows = import_judgements(judged, key)
    assert from_file.to_dict() == from_rows.to_dict()
    assert from_file.per_model["finetuned-xyz"].wins == 6 and from_file.agreement is None  # one annotator


def test_kappa_on_a_fixture():
    rows, key = exported()
    ids = [row["row_id"] for row in rows]
    # Two annotators, labels as in test_statistics: kappa = 17/23 by hand.
    ann = ["left", "left", "left", "right", "right", "tie"]
    ben = ["left", "left", "right", "right", "right", "tie"]
    judged = [{"row_id": r, "annotator": "ann", "verdict": v} for r, v in zip(ids, ann)]
    judged += [{"row_id": r, "annotator": "ben", "verdict": v} for r, v in zip(ids, ben)]
    two = import_judgements(judged, key).agreement
    assert (two.method, two.rows, two.annotators) == ("cohen", 6, 2)
    assert two.kappa == pytest.approx(17 / 23) and two.percent_agreement == pytest.approx(5 / 6)

    # Three annotators on three rows, counts (left, right, tie) [[3,0,0],[0,3,0],[2,1,0]]: kappa = 0.55 by hand
    # (see test_statistics); a fourth row judged by one annotator only does not enter the agreement.
    labels = {ids[0]: ["left"] * 3, ids[1]: ["right"] * 3, ids[2]: ["left", "left", "right"]}
    judged = [{"row_id": r, "annotator": name, "verdict": v}
              for r, votes in labels.items() for name, v in zip(("ann", "ben", "cy"), votes)]
    judged.append({"row_id": ids[3], "annotator": "ann", "verdict": "tie"})
    three = import_judgements(judged, key).agreement
    assert (three.method, three.rows, three.annotators) == ("fleiss", 3, 3)
    assert three.kappa == pytest.approx(0.55)


def test_a_bad_csv_line_is_named_and_nothing_is_imported(tmp_path):
    rows, key = exported()
    path = tmp_path / "judged.csv"
    path.write_text(
        "row_id,prompt,annotator,verdict\n"
        f'{rows[0]["row_id"]},"a prompt\nover two lines",ann,left\n'  # lines 2-3
        f"{rows[1]['row_id']},p,ann,maybe\n"  # line 4: not a verdict
        "r9999,p,ann,left\n"  # line 5: no such row
        f"{rows[2]['row_id']},p,,right\n"  # line 6: who said so?
        f"{rows[0]['row_id']},p,ann,right\n",  # line 7: ann already judged this row on line 2
        encoding="utf-8",
    )
    with pytest.raises(DataError) as caught:
        import_judgements(path, key)
    message = str(caught.value)
    assert "4 problem(s) in the judgements; nothing was imported" in message
    assert f"{path}:4: verdict: expected left, right or tie, found 'maybe'" in message
    assert f"{path}:5: row_id: expected a row_id from the export (e.g. r0001), found 'r9999'" in message
    assert f"{path}:6: annotator: expected the annotator's name or id, found nothing" in message
    assert f"{path}:7: annotator: expected one verdict per annotator and row" in message and "line 2" in message
    assert [(p.line, p.field) for p in caught.value.problems] == [(4, "verdict"), (5, "row_id"), (6, "annotator"),
                                                                  (7, "annotator")]


def test_bad_files_are_named(tmp_path):
    _, key = exported()
    no_verdicts = tmp_path / "columns.csv"
    no_verdicts.write_text("row_id,annotator\nr0001,ann\n")
    with pytest.raises(DataError, match=r"columns.csv:1: verdict: expected a column named verdict"):
        import_judgements(no_verdicts, key)
    broken = tmp_path / "judged.jsonl"
    broken.write_text('{"row_id": "r0001", "annotator": "ann", "verdict": "left"}\n{"row_id": \n')
    with pytest.raises(DataError, match=r"judged.jsonl:2: expected a JSON object, found invalid JSON"):
        import_judgements(broken, key)
    with pytest.raises(FileNotFoundError, match="no such judgements file"):
        import_judgements(tmp_path / "missing.csv", key)


def test_preference_pairs_keep_a_conversation_prompt():
    items = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": "reference"}]} for i in range(2)]
    outputs = {"new": ["Hello there!", "Hi!"], "old": ["hey", "Hi!"]}  # item 1: the same answer twice
    rows, key = export_side_by_side(items, outputs, seed=0)
    judged = [{"row_id": row["row_id"], "annotator": "ann",
               "verdict": "left" if key.rows[row["row_id"]]["left"] == "new" else "right"} for row in rows]
    pairs = preference_pairs(import_judgements(judged, key), items, outputs)
    assert pairs == [{"prompt": items[0]["messages"][:2], "chosen": "Hello there!", "rejected": "hey"}]
    assert validate_record(pairs[0], "preference", file="pairs", line=1) == []
