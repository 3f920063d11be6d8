"""Where tuneforge keeps its state: TUNEFORGE_HOME (default ~/.tuneforge).

It holds the model cache, job directories and, later, the database and artifact store. Every command
reads it through these functions, so tests and users can isolate runs by setting one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def tuneforge_home() -> Path:
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".tuneforge").expanduser()


def models_dir() -> Path:
    return tuneforge_home() / "models"


def jobs_dir() -> Path:
    return tuneforge_home() / "jobs"
