"""Human evaluation round trip: blinded side-by-side export, import of annotators' verdicts, win rates and agreement.

Annotators see rows of (prompt, left answer, right answer) in shuffled order, with the side of each model
drawn per row and no model names; the key that un-blinds them stays with the server. Their verdicts
(left / right / tie) come back as JSONL or CSV, are checked line by line, and become win rates per model,
inter-annotator agreement, and preference pairs for DPO or a reward model.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tuneforge.data.problems import DataError, DataProblem, short_repr
from tuneforge.evaluation.judging import item_conversation, item_question
from tuneforge.evaluation.statistics import WinTieLoss, cohen_kappa, fleiss_kappa, fleiss_table, percent_agreement, win_tie_loss

VERDICTS = ("left", "right", "tie")
EXPORT_COLUMNS = ("row_id", "prompt", "left", "right")
# The CSV annotators fill in: the two last columns start empty.
CSV_COLUMNS = (*EXPORT_COLUMNS, "annotator", "verdict")
REQUIRED_COLUMNS = ("row_id", "annotator", "verdict")


@dataclass(frozen=True)
class SideBySideKey:
    """What un-blinds an export: for each row id, the item it shows and which model is on the left.
    The server keeps it; annotators never see it."""

    models: tuple[str, str]
    rows: dict[str, dict[str, Any]]  # row_id -> {"item": index, "left": model, "right": model}

    def to_dict(self) -> dict:
        return {"models": list(self.models), "rows": self.rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SideBySideKey:
        models = tuple(data["models"])
        if len(models) != 2:
            raise ValueError(f"a side-by-side key names two models, found {list(models)}")
        return cls(models=models, rows={str(k): dict(v) for k, v in data["rows"].items()})


def export_side_by_side(items: Sequence[Any], outputs: Mapping[str, Sequence[str]], *, seed: int
                        ) -> tuple[list[dict[str, str]], SideBySideKey]:
    """Rows for annotators and the key, from two models' outputs on the same items.

    The rows are shuffled, and each model is on the left in half of them (the sides themselves shuffled),
    so neither the order nor a side gives a model away. Row ids are r0001, r0002, ... in the shuffled order.
    """
    if len(outputs) != 2:
        raise ValueError(f"a side-by-side export compares two models, found {len(outputs)}: {', '.join(outputs)}")
    models = tuple(outputs)
    for model in models:
        if len(outputs[model]) != len(items):
            raise ValueError(f"{model} has {len(outputs[model])} outputs for {len(items)} items; one output per item")
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    first_on_left = [True] * ((len(items) + 1) // 2) + [False] * (len(items) // 2)
    rng.shuffle(first_on_left)
    width = max(4, len(str(len(items))))
    rows, key_rows = [], {}
    for position, (item, left_is_first) in enumerate(zip(order, first_on_left), start=1):
        left, right = models if left_is_first else models[::-1]
        row_id = f"r{position:0{width}d}"
        rows.append({"row_id": row_id, "prompt": item_question(items[item]), "left": outputs[left][item],
                     "right": outputs[right][item]})
        key_rows[row_id] = {"item": item, "left": left, "right": right}
    return rows, SideBySideKey(models=models, rows=key_rows)


def _write_atomic(path: str | Path, text: str) -> Path:
    """Write through a temporary file and rename, so a failed write leaves no half file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line; annotators add "annotator" and "verdict" (left, right or tie) to each."""
    return _write_atomic(path, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """row_id, prompt, left, right, then empty annotator and verdict columns for annotators to fill."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row.get(column, "") for column in CSV_COLUMNS])
    return _write_atomic(path, buffer.getvalue())


# ---- import -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Chance-corrected agreement between annotators on the rows several of them judged, on the labels
    they chose (left / right / tie). method: cohen (two annotators) or fleiss (more)."""

    method: str
    kappa: float | None  # None when undefined (every label the same)
    rows: int
    annotators: int
    percent_agreement: float

    def to_dict(self) -> dict:
        return {"method": self.method, "kappa": self.kappa, "rows": self.rows, "annotators": self.annotators,
                "percent_agreement": self.percent_agreement}


@dataclass(frozen=True)
class HumanRow:
    """One exported row once un-blinded: each annotator's winner (a model name or "tie") and the majority."""

    row_id: str
    item: int
    labels: dict[str, str]  # annotator -> left / right / tie, as annotated
    votes: dict[str, str]  # annotator -> model name or "tie"
    consensus: str  # the model most annotators chose; "tie" when they chose tie or no choice leads


@dataclass(frozen=True)
class HumanReport:
    """per_model: each model's wins / ties / losses over all verdicts (each annotator's verdict counts once;
    verdicts on one row are not independent, so these intervals are a little narrow when rows were judged
    several times). by_row: the same over rows, each decided by its majority."""

    models: tuple[str, str]
    annotators: list[str]
    judgements: int
    skipped: int
    rows: list[HumanRow]
    per_model: dict[str, WinTieLoss]
    by_row: dict[str, WinTieLoss]
    agreement: Agreement | None

    def to_dict(self) -> dict:
        return {
            "models": list(self.models),
            "annotators": self.annotators,
            "judgements": self.judgements,
            "rows_judged": len(self.rows),
            "skipped": self.skipped,
            "per_model": {model: outcome.to_dict() for model, outcome in self.per_model.items()},
            "by_row": {model: outcome.to_dict() for model, outcome in self.by_row.items()},
            "agreement": self.agreement.to_dict() if self.agreement else None,
        }


@dataclass
class _Reading:
    file: str
    records: list[tuple[int, Any]] = field(default_factory=list)  # (line, record or None when unreadable)
    problems: list[DataProblem] = field(default_factory=list)


@dataclass(frozen=True)
class JudgementsText:
    """Judgements that arrived as text (an upload to the API), named as the caller named them in errors."""

    text: str
    name: str
    format: str  # jsonl or csv


def _read_jsonl(handle: IO[str], name: str) -> _Reading:
    reading = _Reading(name)
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reading.problems.append(DataProblem(name, line_number, "not_json", "", "a JSON object",
                                                f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        reading.records.append((line_number, record))
    return reading


def _read_csv(handle: IO[str], name: str) -> _Reading:
    reading = _Reading(name)
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        reading.problems.append(DataProblem(name, 0, "empty", "", "a header row with row_id, annotator, verdict",
                                            "an empty file"))
        return reading
    header = [column.strip() for column in header]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        for column in missing:
            reading.problems.append(DataProblem(name, 1, "missing_column", column, f"a column named {column}",
                                                f"columns {', '.join(header) or 'none'}"))
        return reading
    start = reader.line_num + 1
    for values in reader:
        line, start = start, reader.line_num + 1  # a quoted answer may span several lines
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(header):
            reading.problems.append(DataProblem(name, line, "wrong_columns", "", f"{len(header)} values",
                                                f"{len(values)} values"))
            continue
        reading.records.append((line, dict(zip(header, values))))
    return reading


def _read(source: str | Path | JudgementsText | Sequence[Mapping[str, Any]]) -> _Reading:
    if isinstance(source, JudgementsText):
        read = _read_csv if source.format == "csv" else _read_jsonl
        return read(io.StringIO(source.text.removeprefix("\ufeff"), newline=""), source.name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such judgements file")
        csv_file = path.suffix.lower() == ".csv"
        with open(path, encoding="utf-8-sig", newline="" if csv_file else None) as handle:
            return (_read_csv if csv_file else _read_jsonl)(handle, str(path))
    return _Reading("judgements", records=[(index, record) for index, record in enumerate(source, start=1)])


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def import_judgements(source: str | Path | JudgementsText | Sequence[Mapping[str, Any]],
                      key: SideBySideKey | Mapping[str, Any], *, confidence: float = 0.95) -> HumanReport:
    """Read annotators' verdicts (a .jsonl or .csv file, or rows as dicts) and un-blind them through the key.

    Each record has row_id, annotator and verdict (left, right or tie, any case); other fields are ignored.
    A record with neither annotator nor verdict is a row nobody judged and is skipped. Every bad record
    is reported with its file, line, field and what was expected, and then nothing is imported (DataError).
    """
    if not isinstance(key, SideBySideKey):
        key = SideBySideKey.from_dict(key)
    accepted, skipped = read_judgements(source, key)
    return human_report(key, accepted, skipped=skipped, confidence=confidence)


def read_judgements(source: str | Path | JudgementsText | Sequence[Mapping[str, Any]], key: SideBySideKey, *,
                    imported: Iterable[tuple[str, str]] = ()) -> tuple[list[tuple[str, str, str]], int]:
    """The checked verdicts of one source as (row_id, annotator, verdict) and how many rows were left blank.
    `imported`: (row_id, annotator) pairs judged in earlier uploads; a second verdict on one is a problem.
    Raises DataError naming every bad record; nothing is returned then."""
    reading = _read(source)
    problems, accepted, skipped = list(reading.problems), [], 0
    earlier = set(imported)
    seen: dict[tuple[str, str], int] = {}

    def problem(line: int, kind: str, field_name: str, expected: str, found: str) -> None:
        problems.append(DataProblem(reading.file, line, kind, field_name, expected, found))

    for line, record in reading.records:
        if not isinstance(record, Mapping):
            problem(line, "wrong_type", "", "an object with row_id, annotator and verdict", type(record).__name__)
            continue
        if _blank(record.get("annotator")) and _blank(record.get("verdict")):
            skipped += 1
            continue
        row_id, annotator, verdict = record.get("row_id"), record.get("annotator"), record.get("verdict")
        bad = False
        if not isinstance(row_id, str) or row_id.strip() not in key.rows:
            problem(line, "unknown_row", "row_id", "a row_id from the export (e.g. r0001)",
                    "nothing" if _blank(row_id) else short_repr(row_id))
            bad = True
        if not isinstance(annotator, str) or not annotator.strip():
            problem(line, "missing_field", "annotator", "the annotator's name or id",
                    "nothing" if _blank(annotator) else short_repr(annotator))
            bad = True
        if not isinstance(verdict, str) or verdict.strip().lower() not in VERDICTS:
            problem(line, "bad_verdict", "verdict", "left, right or tie", "nothing" if _blank(verdict) else short_repr(verdict))
            bad = True
        if bad:
            continue
        pair = (row_id.strip(), annotator.strip())
        if pair in seen or pair in earlier:
            first = f"first on line {seen[pair]}" if pair in seen else "imported earlier"
            problem(line, "duplicate", "annotator", "one verdict per annotator and row",
                    f"a second verdict by {pair[1]} on {pair[0]} ({first})")
            continue
        seen[pair] = line
        accepted.append((pair[0], pair[1], verdict.strip().lower()))
    if problems:
        raise DataError(problems, headline=f"{reading.file}: {len(problems)} problem(s) in the judgements; nothing was imported")
    return accepted, skipped


def _majority(votes: Iterable[str]) -> str:
    ranked = Counter(votes).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return "tie"
    return ranked[0][0]


def human_report(key: SideBySideKey, accepted: Sequence[tuple[str, str, str]], *, skipped: int = 0,
                 confidence: float = 0.95) -> HumanReport:
    """Win rates and agreement from checked (row_id, annotator, verdict) judgements (read_judgements)."""
    labels_by_row: dict[str, dict[str, str]] = {}
    for row_id, annotator, verdict in accepted:
        labels_by_row.setdefault(row_id, {})[annotator] = verdict
    rows = []
    for row_id in sorted(labels_by_row):
        sides = key.rows[row_id]
        labels = labels_by_row[row_id]
        votes = {annotator: sides[label] if label != "tie" else "tie" for annotator, label in labels.items()}
        rows.append(HumanRow(row_id, int(sides["item"]), labels, votes, _majority(votes.values())))

    all_votes = [vote for row in rows for vote in row.votes.values()]
    consensus = [row.consensus for row in rows]

    def outcomes(verdicts: list[str]) -> dict[str, WinTieLoss]:
        ties = verdicts.count("tie")
        return {model: win_tie_loss(verdicts.count(model), ties, verdicts.count(other), confidence=confidence)
                for model, other in (key.models, key.models[::-1])}

    return HumanReport(models=key.models, annotators=sorted({a for _, a, _ in accepted}), judgements=len(accepted),
                       skipped=skipped, rows=rows, per_model=outcomes(all_votes), by_row=outcomes(consensus),
                       agreement=agreement([row.labels for row in rows]))


def agreement(labels_by_row: Sequence[Mapping[str, str]]) -> Agreement | None:
    """Inter-annotator agreement over the rows that two or more annotators judged; None when there are none.

    Exactly two annotators over those rows: Cohen's kappa. More: Fleiss' kappa, which needs the same number
    of ratings per row, over the rows with the most common number of ratings (the larger on a draw).
    """
    shared = [row for row in labels_by_row if len(row) >= 2]
    if not shared:
        return None
    annotators = sorted({annotator for row in shared for annotator in row})
    if len(annotators) == 2:
        first, second = annotators
        kappa = cohen_kappa([row[first] for row in shared], [row[second] for row in shared])
        used, method = shared, "cohen"
    else:
        counts = Counter(len(row) for row in shared)
        raters = max(counts, key=lambda n: (counts[n], n))
        used, method = [row for row in shared if len(row) == raters], "fleiss"
        kappa = fleiss_kappa(fleiss_table([list(row.values()) for row in used], categories=VERDICTS))
    return Agreement(method=method, kappa=None if math.isnan(kappa) else kappa, rows=len(used),
                     annotators=len({a for row in used for a in row}),
                     percent_agreement=percent_agreement([list(row.values()) for row in used]))


def preference_pairs(report: HumanReport, items: Sequence[Any], outputs: Mapping[str, Sequence[str]]) -> list[dict]:
    """Preference records ({"prompt", "chosen", "rejected"}) for DPO or a reward model, one per row whose
    majority preferred a model; ties, and rows where both models wrote the same answer, give none.
    The prompt is the item's text, or its messages when it is a conversation."""
    missing = [model for model in report.models if model not in outputs]
    if missing:
        raise ValueError(f"outputs has no answers for {', '.join(missing)}; the report compares {', '.join(report.models)}")
    pairs = []
    for row in sorted(report.rows, key=lambda r: r.item):
        if row.consensus == "tie":
            continue
        loser = report.models[1] if row.consensus == report.models[0] else report.models[0]
        chosen, rejected = outputs[row.consensus][row.item], outputs[loser][row.item]
        if chosen == rejected:
            continue
        conversation = item_conversation(items[row.item])
        single_turn = len(conversation) == 1 and conversation[0]["role"] == "user"
        pairs.append({"prompt": conversation[0]["content"] if single_turn else conversation,
                      "chosen": chosen, "rejected": rejected})
    return pairs
