"""API shapes of a job's human evaluation: the blinded side-by-side export of its evaluation samples
(base vs fine-tuned), the annotators' judgements and the report (win rates with Wilson intervals, and
Cohen's or Fleiss' kappa). The key that un-blinds the rows never appears in any of them.
No torch and no database here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MODELS = ("fine-tuned", "base")  # the two answers an export compares, as its report names them
ExportFormat = Literal["jsonl", "csv"]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HumanEvalCreateRequest(_Shape):
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the row order and of which answer is on the left.")


class HumanEval(_Shape):
    """A job's human evaluation: how many rows annotators got and how many verdicts came back."""

    object: Literal["tuneforge.human_eval"] = "tuneforge.human_eval"
    job_id: str
    created_at: int
    models: list[str] = Field(description="The two answers compared: the fine-tuned model's and the base model's.")
    rows: int = Field(description="Rows in the export (the job's evaluation samples, evaluation.report_samples).")
    judgements: int = Field(description="Verdicts imported so far, every annotator's counted once.")
    annotators: list[str]
    uploads: int = Field(description="Judgement uploads imported so far.")


class Rate(_Shape):
    estimate: float | None  # null without data
    low: float | None
    high: float | None
    n: int
    confidence: float
    method: str


class Outcome(_Shape):
    wins: int
    ties: int
    losses: int
    n: int
    win_rate: Rate
    tie_rate: Rate
    loss_rate: Rate


class Agreement(_Shape):
    method: Literal["cohen", "fleiss"]
    kappa: float | None  # null when undefined (every label the same)
    rows: int
    annotators: int
    percent_agreement: float


class HumanEvalReport(_Shape):
    """Un-blinded: each model's wins / ties / losses over every verdict (per_model) and over rows decided by
    their majority (by_row), and the annotators' agreement on the rows several of them judged."""

    object: Literal["tuneforge.human_eval.report"] = "tuneforge.human_eval.report"
    job_id: str
    models: list[str]
    annotators: list[str]
    judgements: int
    rows_judged: int
    skipped: int = Field(description="Rows left blank (neither annotator nor verdict) in the uploads.")
    per_model: dict[str, Outcome]
    by_row: dict[str, Outcome]
    agreement: Agreement | None
