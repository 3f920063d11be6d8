"""How evaluation results are kept (numbers only, samples when asked) and printed in events."""

from __future__ import annotations


def scalar_metrics(metrics: dict, *, keep_samples: bool = False) -> dict:
    """The numbers (and strings) of an evaluation's results; generation samples only when asked."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float, str)) or v is None or (keep_samples and k == "samples")}


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "no metrics"
