"""The API, scheduler and worker processes never import torch or transformers, and the packages keep to
the layering of DESIGN.md's Layout table (api -> spec, db, registry, scheduler; scheduler -> spec, db,
registry; db -> spec; recipes -> spec, data, engine, evaluation; engine -> spec, data, planner;
data -> spec), with the few named exceptions below, each with its reason."""

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
    # The training side. home (TUNEFORGE_HOME, stdlib) is where the model and tokenization caches live.
    "recipes": {"recipes", "spec", "data", "engine", "evaluation"},
    "evaluation": {"evaluation", "spec", "data", "engine"},
    "engine": {"engine", "spec", "data", "planner", "home"},
    "data": {"data", "spec", "home"},
    "launch": {"launch", "spec"},
    # Exports load models (engine), size serving GPUs (planner's hardware table) and serve the playground.
    "export": {"export", "spec", "engine", "evaluation", "planner"},
    # The dashboard is static files; its package only serves them (starlette), so it imports no tuneforge layer.
    "ui": {"ui"},
}
# Single modules one layer may use although their package sits elsewhere.
ALLOWED_MODULES = {
    # The DeepSpeed config is built from the spec by torch-free code that the CLI's preflight and the
    # API's admission check too; the engine's distributed preparation starts DeepSpeed with that config.
    "engine": {"tuneforge.launch.deepspeed",
               # A succeeded job runs its spec's deploy: export from the runtime's finish, for every method.
               "tuneforge.export.deploy"},
    # The supervisor writes its restart and rank_failed events with the recipe's own (stdlib) event writer.
    "launch": {"tuneforge.engine.events"},
    # Endpoint judges are the OpenAI-compatible servers the operator named in TUNEFORGE_JUDGE_ENDPOINTS.
    # Their hosts are checked for private addresses (SSRF) by tuneforge/egress.py (stdlib + httpcore), at
    # build and connection time.
    "evaluation": {"tuneforge.settings", "tuneforge.egress"},
    # Submission refuses a job whose judge endpoint is unknown or resolves to a private address, with the
    # same egress check the judge makes at call time.
    "scheduler": {"tuneforge.egress"},
    # The API serves a job's human evaluation from its directory: the store and its round trip are
    # stdlib + numpy (no torch), and the process check above imports the app to prove it.
    # The app also mounts the dashboard's static files (ui/ holds no logic, only the mount and its CSP headers).
    "api": {"tuneforge.evaluation.human_store", "tuneforge.ui"},
}
# Files that break their package's rule, and why.
ALLOWED_IN_FILE = {
    # `tuneforge data` (a CLI command living beside the data code) loads a model's tokenizer to count tokens.
    "data/command.py": {"tuneforge.engine.base_models", "tuneforge.engine.model_loading"},
    # The Exports API's job (method export) runs the same export as `tuneforge export`, in the recipe process.
    "recipes/export_run.py": {"tuneforge.export", "tuneforge.export.source"},
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


def _tuneforge_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(name for name in names if name.startswith("tuneforge.") and name.count(".") >= 1)
    return found


def _tuneforge_imports(path: Path) -> set[str]:
    return {name.split(".")[1] for name in _tuneforge_modules(path)}


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in (SRC / package).rglob("*.py"):
            excused = ALLOWED_MODULES.get(package, set()) | ALLOWED_IN_FILE.get(str(path.relative_to(SRC)), set())
            extra = {name.split(".")[1] for name in _tuneforge_modules(path) - excused} - allowed
            if extra:
                wrong.append(f"{path.relative_to(SRC)} imports {sorted(extra)}")
    for path in (SRC / "recipes").rglob("*.py"):
        if {"db", "api", "scheduler"} & _tuneforge_imports(path):
            wrong.append(f"{path.relative_to(SRC)} touches the control plane")
    assert wrong == []
