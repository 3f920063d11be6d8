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
        if spec.method in ("ppo", "grpo"):  # online RL reads prompts, not replies to imitate
            from tuneforge.engine.rl.prompts import check_prompts

            check_prompts(spec.dataset.path, min_prompts=MIN_TRAINING_EXAMPLES)
            if spec.dataset.validation_path:
                check_prompts(spec.dataset.validation_path)
        else:
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
    """summary: the job's JobSummary (spec/jobdir.py); then the evaluation report's table."""
    from tuneforge.spec.jobdir import read_report

    print(f"done in {summary.wall_time_s:.0f}s: {summary.steps} steps, {summary.tokens_seen:,} tokens")
    report = read_report(job_dir) if summary.report else None
    if report is not None:
        from tuneforge.evaluation.report import format_report

        print(format_report(report))
    else:
        for metric in type(summary.eval.fine_tuned).model_fields:
            before, after = summary.eval.base.value(metric), summary.eval.fine_tuned.value(metric)
            if after is not None:
                print(f"  eval {metric}: {'' if before is None else f'{before:.4f} -> '}{after:.4f}")
    if summary.best_checkpoint is not None:
        best = summary.best_checkpoint
        print(f"  best checkpoint: step {best.step} ({best.metric}={best.value:.4f})")
    step = f" (step {summary.output_step})" if summary.output_step not in (None, summary.steps) else ""
    print(f"  {summary.output}{step}: {job_dir / summary.output}")
    if (deployed := summary.deployment) is not None:  # deploy: in the spec (export/deploy.py)
        print(f"  deploy ({deployed.format} for {deployed.target}): " + (
            f"{job_dir / deployed.path}\n    {deployed.command}" if deployed.status == "succeeded" else
            f"failed: {deployed.error}\n    retry with: tuneforge export {job_dir} --target {deployed.target} --out DIR"))


def _evaluation_spec(args: argparse.Namespace):
    """The EvaluationSpec of `tuneforge eval`: --spec's file, then the flags over it."""
    import yaml
    from pydantic import ValidationError

    from tuneforge.spec.job import EvaluationSpec

    data: dict = {}
    if args.spec:
        try:
            text = args.spec.read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
        except OSError as exc:
            raise UserError(f"--spec {args.spec}: cannot read it ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise UserError(f"--spec {args.spec}: malformed YAML ({exc})") from None
        if isinstance(data, dict) and set(data) == {"evaluation"}:  # a job file's section works too
            data = data["evaluation"]
        if not isinstance(data, dict):
            raise UserError(f"--spec {args.spec}: expected a mapping of evaluation fields (metrics, graders, ...)")
    if args.metrics:
        data["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for flag, name in (("max_examples", "max_eval_examples"), ("max_new_tokens", "max_new_tokens"),
                       ("batch_size", "generation_batch_size"), ("samples", "report_samples")):
        if getattr(args, flag) is not None:
            data[name] = getattr(args, flag)
    try:
        return EvaluationSpec.model_validate(data)
    except ValidationError as exc:
        where = f"--spec {args.spec}" if args.spec else "tuneforge eval"
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
        raise UserError(f"{where}: invalid evaluation spec\n  " + "\n  ".join(problems)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.standalone import (
        EvalInputError,
        evaluate_model,
        format_lm_eval,
        lm_eval_available,
        resolve_target,
        run_lm_eval,
        LM_EVAL_MISSING,
    )
    from tuneforge.spec.jobdir import write_json_atomic

    if args.lm_eval_tasks and not lm_eval_available():  # before loading anything
        raise UserError(LM_EVAL_MISSING)
    spec = _evaluation_spec(args)
    try:
        target = resolve_target(args.model)
        data = args.data or _job_validation_file(target)
        if data is not None and not data.is_file():
            raise UserError(f"--data {data}: no such file")
        report = None
        if data is not None:
            from tuneforge.engine.quiet import quiet_libraries
            from tuneforge.evaluation.report import format_report

            quiet_libraries()
            report = evaluate_model(target, data.expanduser().resolve(), spec, base=args.base,
                                    note=lambda message: print(message, file=sys.stderr))
            print(format_report(report))
        lm_eval = None
        if args.lm_eval_tasks:
            tasks = [Path(t).expanduser() for t in args.lm_eval_tasks.split(",") if t.strip()]
            lm_eval = run_lm_eval(target, tasks, limit=spec.max_eval_examples)
            print(format_lm_eval(lm_eval))
        if report is None and lm_eval is None:
            raise UserError("name the data to evaluate on (--data FILE) or lm-evaluation-harness tasks (--lm-eval-tasks)")
    except EvalInputError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:
        from tuneforge.engine.runtime import INPUT_ERRORS

        if isinstance(exc, INPUT_ERRORS):  # a model, data file or metric that cannot be used: not a crash
            raise UserError(str(exc)) from None
        raise
    if args.output:
        value = report.model_dump(mode="json") if report is not None else {}
        if lm_eval is not None:
            value["lm_eval"] = lm_eval
        write_json_atomic(args.output.expanduser().resolve(), value)
        print(f"report: {args.output}", file=sys.stderr)
    return EXIT_OK


def _job_validation_file(target) -> Path | None:
    """A job's own validation file, when --data is not given."""
    spec = target.job_spec
    return Path(spec.dataset.validation_path) if spec is not None and spec.dataset.validation_path else None


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

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model, adapter, job or checkpoint on a data file (optionally against its base)",
        description="Score a model on a data file with the metrics and graders asked for, print the table "
        "(value, sample size, confidence interval; base vs fine-tuned with --base) and a few generations.",
    )
    evaluate.add_argument("--model", required=True, metavar="MODEL",
                          help="a built-in model, a model or adapter directory, a job directory or a checkpoint "
                          "(JOB_DIR/checkpoints/step-N)")
    evaluate.add_argument("--data", type=Path, metavar="FILE",
                          help="evaluation data (any format tuneforge trains on); default: a job's validation file")
    evaluate.add_argument("--metrics", metavar="A,B,...",
                          help="comma-separated: loss, perplexity, token_accuracy, rouge1, rouge2, rougeL, bleu, chrf, "
                          "exact_match, token_f1, accuracy, json_valid, json_schema")
    evaluate.add_argument("--spec", type=Path, metavar="EVAL.yaml",
                          help="evaluation fields (metrics, graders, accuracy, json_schema, max_new_tokens, ...), "
                          "as in a job spec's evaluation section")
    evaluate.add_argument("--base", action="store_true", help="also evaluate the base model and compare")
    evaluate.add_argument("--output", type=Path, metavar="report.json", help="write the report as JSON")
    evaluate.add_argument("--max-examples", type=int, metavar="N", help="evaluate on the first N examples (default 200)")
    evaluate.add_argument("--max-new-tokens", type=int, metavar="N", help="generation budget per answer (default 64)")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="prompts generated together (default 16)")
    evaluate.add_argument("--samples", type=int, metavar="N", help="example generations to show (default 5)")
    evaluate.add_argument("--lm-eval-tasks", metavar="TASK.yaml,...",
                          help="also run EleutherAI lm-evaluation-harness on these local task files (when installed)")
    evaluate.set_defaults(handler=cmd_eval)

    from tuneforge.control_plane_cli import add_control_plane_commands
    from tuneforge.data.command import add_data_commands
    from tuneforge.planner.command import add_plan_command

    add_data_commands(commands)
    add_plan_command(commands)
    add_control_plane_commands(commands)
    from tuneforge.export.command import add_export_commands

    add_export_commands(commands)  # export, serve
    from tuneforge.sweep_cli import add_sweep_commands

    add_sweep_commands(commands)  # sweep run, sweep show
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
    # Run the imported module's main, not __main__'s: the control-plane commands raise tuneforge.cli.UserError,
    # which a main defined in __main__ (a second copy of this module) would not catch.
    from tuneforge.cli import main as imported_main

    sys.exit(imported_main())
