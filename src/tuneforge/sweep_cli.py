"""`tuneforge sweep run | show`: run a sweep here (an embedded control plane: the local database, the driver and
a local worker in this process) or on a server (--server: upload the data, POST /v1/sweeps), and show one.

Both ways run the same code: trials are jobs, the study is in the database, and a local run stopped with
Ctrl-C continues with `tuneforge sweep run --resume ID`.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOCAL_TENANT = "default"  # the tenant of `tuneforge server`'s admin key: local sweeps show up there too


class SweepInputError(Exception):
    """Bad input: printed as one paragraph, exit code 2 (caught here: under `python -m tuneforge.cli` the
    UserError that cli.main catches is __main__'s, not tuneforge.cli's)."""


def _user_error(message: str) -> Exception:
    return SweepInputError(message)


def _reported(handler):
    def run(args: argparse.Namespace) -> int:
        from tuneforge.spec.jobdir import EXIT_BAD_INPUT

        try:
            return handler(args)
        except SweepInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return run


def _load(path: Path):
    from tuneforge.spec.sweep import SweepSpecError, load_sweep_spec

    try:
        return load_sweep_spec(path)
    except SweepSpecError as exc:
        raise _user_error(str(exc)) from None


# ---- against a server ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    import httpx

    key = args.api_key or os.environ.get("TUNEFORGE_API_KEY")
    if not key:
        raise _user_error("--server needs an API key: --api-key KEY or TUNEFORGE_API_KEY")
    return httpx.Client(base_url=args.server.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _answer(response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = error["message"] + (f" (param {error['param']})" if error.get("param") else "")
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise _user_error(f"the server answered {response.status_code}: {message}")
    return response.json()


def _upload(http, path: str) -> str:
    file = Path(path).expanduser()
    try:
        with open(file, "rb") as handle:
            uploaded = _answer(http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (file.name, handle)}))
    except OSError as exc:
        raise _user_error(f"{file}: cannot read it ({exc.strerror or exc})") from None
    deadline = time.monotonic() + 600
    while uploaded["status"] == "uploaded" and time.monotonic() < deadline:
        time.sleep(0.5)
        uploaded = _answer(http.get(f"/v1/files/{uploaded['id']}"))
    if uploaded["status"] != "processed":
        raise _user_error(f"{file}: the server refused the data: {uploaded.get('status_details') or uploaded['status']}")
    return uploaded["id"]


def _run_on_server(args: argparse.Namespace, spec) -> int:
    body = spec.model_dump(mode="json", exclude_unset=True)
    body["base"] = spec.base.model_dump(mode="json", exclude_unset=True)
    with _client(args) as http:
        dataset = body["base"]["dataset"]
        for field in ("path", "validation_path"):  # a dataset:NAME@vN the server pins; a local file is uploaded
            value = getattr(spec.base.dataset, field)
            if value and not _is_dataset_reference(value):
                dataset[field] = _upload(http, value)
        sweep = _answer(http.post("/v1/sweeps", json=body))
        print(f"sweep {sweep['id']} created; follow it with: tuneforge sweep show {sweep['id']} --server {args.server}")
    return 0


# ---- here ---------------------------------------------------------------------------------------------


def _local_database():
    from tuneforge.control_plane_cli import _database

    return _database()


def _store_local_file(session, store, path: str) -> str:
    """A local data file as an uploaded file of the local tenant, stored as a server stores an upload: sealed
    for the tenant with encryption at rest (its own blob, as api/routers/files.py commits one), else a plaintext
    blob; validated the way uploads are (read from the file itself, so no plaintext copy lands in the store)."""
    from tuneforge.data.loading import file_sha256
    from tuneforge.db import files as file_rows
    from tuneforge.registry.artifacts import CHUNK
    from tuneforge.registry.datasets import inspect_dataset

    file = Path(path).expanduser().resolve()
    try:
        writer = store.open_staging(max_bytes=1 << 40, name=file.name, tenant_id=LOCAL_TENANT)
        try:
            with open(file, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    writer.write(chunk)
            staged = writer.finish()
            report = inspect_dataset(file, display_name=file.name)
            if file_sha256(file) != staged.sha256:
                raise _user_error(f"{file}: the file changed while it was read; run the sweep again")
            if not report.valid:
                raise _user_error(report.summary)
            store.commit(staged, session=session)  # the blob before the row, in the row's transaction
        finally:
            writer.discard()
    except OSError as exc:
        raise _user_error(f"{file}: cannot read it ({exc.strerror or exc})") from None
    return file_rows.create_file(session, tenant_id=LOCAL_TENANT, filename=file.name, purpose="fine-tune",
                                 size=staged.size, sha256=staged.sha256, report=report.model_dump(mode="json"),
                                 status=file_rows.PROCESSED, status_details=None).id


def _is_dataset_reference(value: str) -> bool:
    from tuneforge.registry.dataset_versions import is_reference

    return is_reference(value)


def _local_data(session, store, value: str, *, field: str) -> str:
    """The file id a local sweep trains on: a registered dataset of the local tenant (dataset:NAME@vN or
    dataset:NAME:ALIAS, pinned to the file that version holds now, as the server pins one), else a local
    file stored as an upload."""
    if not _is_dataset_reference(value):
        return _store_local_file(session, store, value)
    from tuneforge.registry.dataset_versions import DatasetError, resolve_file_reference

    try:
        return resolve_file_reference(session, tenant_id=LOCAL_TENANT, ref=value).file_id
    except DatasetError as exc:
        raise _user_error(f"base.dataset.{field}: {exc.message} (a local sweep reads the datasets of tenant "
                          f"{LOCAL_TENANT!r}: `tuneforge datasets list --tenant {LOCAL_TENANT}` shows them)") from None


def _local_store(settings):
    """The artifact folder as the server opens it: sealing the local tenant's files under its key from
    TUNEFORGE_KEYS_DIR unless TUNEFORGE_ENCRYPT_AT_REST=false."""
    from tuneforge.registry.artifacts import LocalArtifactStore

    try:
        return LocalArtifactStore.from_settings(settings)
    except ValueError as exc:
        raise _user_error(str(exc)) from None


def _run_here(args: argparse.Namespace, spec) -> int:
    from tuneforge.db import sweeps as sweep_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.sweeps import SweepDriver
    from tuneforge.scheduler.worker import Worker

    settings, db = _local_database()
    if args.resume:
        with db.read_session() as session:
            sweep = sweep_rows.get_sweep(session, tenant_id=LOCAL_TENANT, sweep_id=args.resume)
        if sweep is None:
            raise _user_error(f"no local sweep {args.resume!r} (tuneforge sweep show lists none by that id)")
        sweep_id = sweep.id
    else:
        store = _local_store(settings)
        with db.session() as session:
            tenant_rows.ensure_tenant(session, tenant_id=LOCAL_TENANT)
            base = spec.base.model_copy(deep=True)
            from tuneforge.spec.job import BUILTIN_BASE_MODELS

            if base.model.base_model not in BUILTIN_BASE_MODELS and not base.model.base_model.startswith("ft:"):
                base.model.base_model = str(Path(base.model.base_model).expanduser().resolve())  # a local directory
            base.dataset.path = _local_data(session, store, spec.base.dataset.path, field="path")
            if spec.base.dataset.validation_path:
                base.dataset.validation_path = _local_data(session, store, spec.base.dataset.validation_path,
                                                           field="validation_path")
            data = spec.model_dump(mode="json")
            data["base"] = base.model_dump(mode="json")
            sweep_id = sweep_rows.create_sweep(session, tenant_id=LOCAL_TENANT, name=spec.name, spec=data).id
    print(f"sweep {sweep_id}: running here (Ctrl-C stops it; continue with: tuneforge sweep run --resume {sweep_id})",
          file=sys.stderr)
    driver = SweepDriver(db, settings)
    worker = Worker(db, settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=args.cpu_slots))
    stop = threading.Event()
    try:
        while not stop.is_set():
            driver.run_once()
            worker.run_once()
            with db.read_session() as session:
                if sweep_rows.get_sweep(session, tenant_id=LOCAL_TENANT, sweep_id=sweep_id).status != sweep_rows.RUNNING:
                    break
            stop.wait(settings.poll_seconds)
    except KeyboardInterrupt:
        print("stopping: the running trials checkpoint and resume with --resume", file=sys.stderr)
    finally:
        worker.shutdown()
    _show_local(db, sweep_id)
    return 0


# ---- show ---------------------------------------------------------------------------------------------


def _show_local(db, sweep_id: str) -> None:
    from tuneforge.db import sweeps as sweep_rows
    from tuneforge.scheduler.sweeps import sweep_object

    with db.read_session() as session:
        sweep = sweep_rows.get_sweep(session, tenant_id=LOCAL_TENANT, sweep_id=sweep_id)
        if sweep is None:
            raise _user_error(f"no local sweep {sweep_id!r}")
        trials = sweep_rows.trials_of(session, sweep_id=sweep_id)
    shown = sweep_object(db, sweep, with_importance=True).model_dump(mode="json")
    rows = [{"number": t.number, "status": t.status, "job_id": t.job_id, "params": t.params, "values": t.values,
             "error": t.error} for t in trials]
    print(format_sweep(shown, rows))


def format_sweep(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> str:
    """The trial table, the best configuration, the parameters' importance and a text plot of objective vs trial."""
    objectives = [o["metric"] for o in sweep["spec"]["objectives"]]
    params = list(sweep["spec"]["space"])
    lines = [f"sweep {sweep['id']} ({sweep['name'] or 'unnamed'}): {sweep['status']}"
             + (f", {sweep['stop_reason']}" if sweep.get("stop_reason") else "") + f"; {sweep['gpu_hours']:.4f} GPU-hours"]
    header = ["trial", "status", *objectives, *params]
    table = [header]
    for t in trials:
        values = [f"{v:.4f}" for v in t["values"]] if t["values"] else ["-"] * len(objectives)
        table.append([str(t["number"]), t["status"], *values, *(_short(t["params"].get(p, "-")) for p in params)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
    for best in sweep["best"]:
        values = ", ".join(f"{m}={v:.4f}" for m, v in zip(objectives, best["values"]))
        lines.append(f"best: trial {best['number']} ({values}) job {best['job_id']} model {best['fine_tuned_model']}")
        lines += [f"  {path} = {value}" for path, value in best["params"].items()]
    if sweep.get("importance"):
        lines.append(f"importance for {objectives[0]} (PED-ANOVA):")
        lines += [f"  {name:<32} {'#' * round(20 * value):<20} {value:.3f}" for name, value in sweep["importance"].items()]
    lines += text_plot([(t["number"], t["values"][0]) for t in trials if t["values"]], objectives[0])
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def text_plot(points: list[tuple[int, float]], metric: str, height: int = 8) -> list[str]:
    """Objective vs trial number as rows of characters (one column per trial)."""
    if len(points) < 2:
        return []
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0
    grid = [[" "] * len(points) for _ in range(height)]
    for column, (_, value) in enumerate(points):
        grid[height - 1 - round((value - low) / span * (height - 1))][column] = "*"
    rows = [f"{metric} vs trial:"]
    for index, row in enumerate(grid):
        label = high - index * span / (height - 1)
        rows.append(f"  {label:>10.4g} |{''.join(row)}")
    rows.append(f"  {'':>10} +{'-' * len(points)} trials {points[0][0]}..{points[-1][0]}")
    return rows


def cmd_sweep_run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.spec or args.server:
            raise _user_error("--resume ID continues a local sweep; it takes no sweep file or --server")
        return _run_here(args, None)
    if not args.spec:
        raise _user_error("name a sweep file (tuneforge sweep run SWEEP.yaml) or a local sweep to continue (--resume ID)")
    spec = _load(args.spec)
    return _run_on_server(args, spec) if args.server else _run_here(args, spec)


def cmd_sweep_show(args: argparse.Namespace) -> int:
    if args.server:
        with _client(args) as http:
            sweep = _answer(http.get(f"/v1/sweeps/{args.sweep_id}"))
            trials = _answer(http.get(f"/v1/sweeps/{args.sweep_id}/trials"))["data"]
        print(format_sweep(sweep, trials))
        return 0
    _, db = _local_database()
    _show_local(db, args.sweep_id)
    return 0


def add_sweep_commands(commands) -> None:
    sweep = commands.add_parser("sweep", help="hyperparameter search: trials are jobs (Optuna)",
                                description="Run or show a hyperparameter sweep (docs/sweeps.md).")
    actions = sweep.add_subparsers(dest="sweep_action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="run a sweep here, or submit it to a server with --server")
    run.add_argument("spec", type=Path, nargs="?", help="YAML sweep spec, e.g. configs/sweeps/json-extraction-lora.yaml")
    run.add_argument("--server", metavar="URL", help="submit to this tuneforge server instead of running here")
    run.add_argument("--api-key", help="the server's API key (default: TUNEFORGE_API_KEY)")
    run.add_argument("--resume", metavar="SWEEP_ID", help="continue a local sweep that was stopped")
    run.add_argument("--cpu-slots", type=int, help="trials at once on a machine without a GPU (default: cores / 4)")
    run.set_defaults(handler=_reported(cmd_sweep_run))
    show = actions.add_parser("show", help="trials, best configuration, importance and a plot of objective vs trial")
    show.add_argument("sweep_id")
    show.add_argument("--server", metavar="URL", help="ask this tuneforge server (default: the local database)")
    show.add_argument("--api-key", help="the server's API key (default: TUNEFORGE_API_KEY)")
    show.set_defaults(handler=_reported(cmd_sweep_show))
