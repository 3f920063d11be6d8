"""The API, scheduler and worker processes never import torch or transformers, and the packages keep to
the layering of DESIGN.md (api -> spec, db, registry, scheduler; scheduler -> spec, db, registry;
db -> spec; recipes never touch db)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tuneforge"

# registry validates uploaded datasets with data.validation (stdlib only): the data flow of DESIGN.md
# puts dataset records in the registry. The scheduler asks the planner (torch-free arithmetic over
# spec and a config.json) whether a job can ever fit, and builds recipe commands with launch.
ALLOWED = {
    "api": {"api", "spec", "db", "registry", "scheduler", "settings", "home"},
    "scheduler": {"scheduler", "spec", "db", "registry", "settings", "home", "launch", "planner"},
    "planner": {"planner", "spec"},
    "registry": {"registry", "spec", "db", "data"},
    "db": {"db", "spec"},
    "spec": {"spec"},
}


def test_control_plane_processes_do_not_import_torch():
    code = (
        "import sys\n"
        "import tuneforge.api.app, tuneforge.api.server, tuneforge.scheduler.worker, tuneforge.scheduler.reaper\n"
        "import tuneforge.scheduler.executors.local, tuneforge.scheduler.executors.kubernetes_jobs\n"
        "import tuneforge.scheduler.simulation, tuneforge.control_plane_cli\n"
        "from tuneforge.cli import build_parser; build_parser()\n"
        "tuneforge.api.app.create_app()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def _tuneforge_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(name.split(".")[1] for name in names if name.startswith("tuneforge.") and name.count(".") >= 1)
    return found


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in (SRC / package).rglob("*.py"):
            extra = _tuneforge_imports(path) - allowed
            if extra:
                wrong.append(f"{path.relative_to(SRC)} imports {sorted(extra)}")
    for path in (SRC / "recipes").rglob("*.py"):
        if {"db", "api", "scheduler"} & _tuneforge_imports(path):
            wrong.append(f"{path.relative_to(SRC)} touches the control plane")
    assert wrong == []
