"""The `tuneforge` command.

Exit codes: 0 success, 1 the job failed while running, 2 bad input (spec, data, arguments) and nothing
was started, 75 stopped on request (SIGTERM, Ctrl-C, spot notice) after a checkpoint: resume it. Heavy imports (torch, transformers) happen only inside the commands that need them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tuneforge.spec.jobdir import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED


class UserError(Exception):
    """An error caused by input, printed as one paragraph without a traceback."""


def _resolve_paths(spec) -> None:
    """Make file paths absolute against the current directory, so spec.json works from anywhere."""
    spec.dataset.path = str(Path(spec.dataset.path).expanduser().resolve())
    if spec.dataset.validation_path:
        spec.dataset.validation_path = str(Path(spec.dataset.validation_path).expanduser().resolve())
    from tuneforge.spec.job import BUILTIN_BASE_MODELS

    if spec.model.base_model not in BUILTIN_BASE_MODELS:
        spec.model.base_model = str(Path(spec.model.base_model).expanduser().resolve())


def _preflight(spec) -> None:
    """Everything that can be checked before a job directory exists: data files and the model path."""
    from tuneforge.data.loading import MIN_TRAINING_EXAMPLES, load_examples
    from tuneforge.data.problems import DataError
    from tuneforge.spec.job import BUILTIN_BASE_MODELS

    try:
        _, data_format = load_examples(spec.dataset.path, spec.dataset.format, min_examples=MIN_TRAINING_EXAMPLES)
        if spec.dataset.validation_path:
            load_examples(spec.dataset.validation_path, data_format)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if spec.model.base_model not in BUILTIN_BASE_MODELS and not (Path(spec.model.base_model) / "config.json").is_file():
        raise UserError(
            f"model.base_model {spec.model.base_model!r}: expected a built-in model ({', '.join(BUILTIN_BASE_MODELS)}) "
            "or a local Hugging Face model directory with a config.json"
        )
    from tuneforge.launch.deepspeed import deepspeed_problem

    if problem := deepspeed_problem(spec):
        raise UserError(problem)
    from tuneforge.planner import PlannerError, plan_job

    try:
        plan = plan_job(spec)
    except PlannerError:
        return  # an architecture the planner cannot describe: the job's own memory handling decides
    if not plan.fits:
        advice = "".join(f"\n  - {r}" for r in plan.recommendations[:4])
        raise UserError(f"the job does not fit resources.gpu_type {spec.resources.gpu_type}: {plan.reason}"
                        + (f"\noptions:{advice}" if advice else ""))


def _new_job_dir(spec) -> Path:
    from tuneforge.home import jobs_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = jobs_dir() / f"{spec.name or 'job'}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.spec import SpecError, load_job_spec
    from tuneforge.spec.jobdir import SPEC_FILE, SUMMARY_FILE, read_spec, write_spec

    if args.resume:
        if args.spec or args.overrides or args.job_dir:
            raise UserError("--resume DIR continues a job exactly as specified in DIR/spec.json; "
                            "it takes no spec file, overrides or --job-dir")
        job_dir = args.resume.expanduser().resolve()
        if not (job_dir / SPEC_FILE).is_file():
            raise UserError(f"{job_dir}: not a job directory (no {SPEC_FILE})")
        spec = read_spec(job_dir)  # as submitted: the recipe resolves its "auto" values again, the same way
        _preflight(spec)
    else:
        if not args.spec:
            raise UserError("name a job spec (tuneforge train JOB.yaml) or a job to continue (--resume DIR)")
        try:
            spec = load_job_spec(args.spec, args.overrides)
        except SpecError as exc:
            raise UserError(str(exc)) from None
        _resolve_paths(spec)
        _preflight(spec)
        job_dir = args.job_dir.expanduser().resolve() if args.job_dir else _new_job_dir(spec)
        if (job_dir / SUMMARY_FILE).exists():
            raise UserError(f"{job_dir} holds a finished job (it has {SUMMARY_FILE}); choose another --job-dir")
        if job_dir.exists() and any(job_dir.iterdir()):
            if not (job_dir / SPEC_FILE).exists():
                raise UserError(f"{job_dir} exists and is not a tuneforge job directory; choose another --job-dir")
            if read_spec(job_dir) != spec:
                raise UserError(f"{job_dir} holds a job with a different spec; continue it with --resume {job_dir} "
                                "or choose another --job-dir")
        job_dir.mkdir(parents=True, exist_ok=True)
        write_spec(job_dir, spec)  # once: spec.json never changes after submission
    if (job_dir / SUMMARY_FILE).exists():
        raise UserError(f"{job_dir} holds a finished job (it has {SUMMARY_FILE}); choose another --job-dir")
    print(f"job directory: {job_dir}", file=sys.stderr)
    nodes = spec.resources.num_nodes
    if nodes > 1 and args.node_rank is None:
        _print_node_commands(job_dir, spec, args.rdzv_endpoint)
        return EXIT_OK
    if args.node_rank is not None and not 0 <= args.node_rank < nodes:
        raise UserError(f"--node-rank {args.node_rank}: expected 0 to {nodes - 1} (resources.num_nodes is {nodes})")
    if nodes > 1 and not args.rdzv_endpoint:
        raise UserError("--node-rank needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
    return _run_recipe(job_dir, spec, progress=not args.no_progress, node_rank=args.node_rank or 0,
                       rdzv_endpoint=args.rdzv_endpoint)


def _print_node_commands(job_dir: Path, spec, endpoint: str | None) -> None:
    """What to run on each node: the job directory must be on storage every node mounts at the same path."""
    import socket

    from tuneforge.launch.commands import DEFAULT_RDZV_PORT

    endpoint = endpoint or f"{socket.getfqdn()}:{DEFAULT_RDZV_PORT}"
    r = spec.resources
    print(f"a job on {r.num_nodes} nodes x {r.num_gpus} processes: run on each node (job directory on shared storage):")
    for node in range(r.num_nodes):
        print(f"  node {node}: tuneforge train --resume {job_dir} --node-rank {node} --rdzv-endpoint {endpoint}")


def _run_recipe(job_dir: Path, spec, *, progress: bool, node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run the recipe in a child process (torchrun for several), restarting it from its checkpoint if it dies."""
    from tuneforge.launch.commands import recipe_command
    from tuneforge.launch.supervisor import supervise
    from tuneforge.spec.jobdir import read_summary

    command = recipe_command(spec, job_dir, progress=progress, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                             job_id=job_dir.name)
    outcome = supervise(job_dir, command, max_restarts=spec.checkpoint.max_restarts)
    if outcome.status == "succeeded" and node_rank != 0:
        print(f"node {node_rank}: done; node 0 wrote the results to {job_dir}", file=sys.stderr)
        return EXIT_OK
    if outcome.status == "succeeded":
        _print_summary(read_summary(job_dir), job_dir)
        return EXIT_OK
    if outcome.status == "preempted":
        print(f"stopped after a checkpoint; continue with: tuneforge train --resume {job_dir}", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"error: the job failed: {outcome.reason}\n  events: {job_dir / 'events.jsonl'}", file=sys.stderr)
    return EXIT_BAD_INPUT if outcome.exit_code == EXIT_BAD_INPUT else EXIT_FAILED


def _print_summary(summary, job_dir: Path) -> None:
    """summary: the job's JobSummary (spec/jobdir.py)."""
    print(f"done in {summary.wall_time_s:.0f}s: {summary.steps} steps, {summary.tokens_seen:,} tokens")
    for metric in ("loss", "perplexity", "exact_match"):
        before, after = getattr(summary.eval.base, metric), getattr(summary.eval.fine_tuned, metric)
        if after is not None:
            print(f"  eval {metric}: {'' if before is None else f'{before:.4f} -> '}{after:.4f}")
    print(f"  {summary.output}: {job_dir / summary.output}")


def cmd_spec(args: argparse.Namespace) -> int:
    from tuneforge.spec import SpecError, load_job_spec
    from tuneforge.spec.reference import reference_text

    if not args.spec:
        print(reference_text())
        return EXIT_OK
    try:
        spec = load_job_spec(args.spec, args.overrides)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    print(spec.model_dump_json(indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from tuneforge.spec.reference import reference_text

    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune large language models on your own hardware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="run a fine-tuning job in the foreground",
        description="Run the job described by a YAML job spec; dotted overrides like training.learning_rate=1e-4 follow it.",
        epilog="job spec fields (dotted.name = default):\n" + reference_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("spec", type=Path, nargs="?", help="YAML job spec, e.g. configs/sft/smollm2-135m-lora.yaml")
    train.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="spec overrides")
    train.add_argument("--job-dir", type=Path, help="job directory (default: $TUNEFORGE_HOME/jobs/NAME-TIME)")
    train.add_argument("--resume", type=Path, metavar="JOB_DIR", help="continue a stopped or crashed job from its newest verified checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    train.add_argument("--node-rank", type=int, metavar="N",
                       help="multi-node jobs: this machine's node (0 .. resources.num_nodes-1); without it, print each node's command")
    train.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="multi-node jobs: node 0's rendezvous address")
    train.set_defaults(handler=cmd_train)

    spec = commands.add_parser("spec", help="print the job spec reference, or validate a spec file and print it resolved")
    spec.add_argument("spec", type=Path, nargs="?", help="YAML job spec to validate")
    spec.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="spec overrides")
    spec.set_defaults(handler=cmd_spec)

    from tuneforge.control_plane_cli import add_control_plane_commands
    from tuneforge.data.command import add_data_commands
    from tuneforge.planner.command import add_plan_command

    add_data_commands(commands)
    add_plan_command(commands)
    add_control_plane_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train job.yaml --job-dir D a.b=1`), which argparse's
    # positional handling does not allow; collect the leftovers that look like overrides.
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
