"""How close is the cost estimate to what jobs cost? Real jobs through a real `tuneforge server`, one at a time.

    .venv/bin/python bench/cost_estimate.py [--jobs tiny-steps,...,smollm2-ppo,smollm2-eval-run,smollm2-eval-judged]

A fresh TUNEFORGE_HOME and SQLite database, `tuneforge server --cpu-slots 1` with its worker, the json-extraction
example data uploaded through the files API; each job is created through `POST /v1/fine_tuning/jobs` (its
`tuneforge.cost` holds the estimate made at creation) and waited for, and so is each eval run (`POST
/v1/evals/{id}/runs`, its run object's `tuneforge.cost`); its actual device-hours are the scheduler's own
accounting. Jobs run one at a time, so the numbers are the jobs' own, not a queue's. Run it
alone on the machine: the estimate error is a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "json-extraction"
QUICK_EVAL = {"metrics": ["loss", "exact_match"], "max_eval_examples": 16, "eval_before_training": False}
RL_DATA = REPO / "examples" / "rl"
FORMAT = {"type": "string_check", "name": "format", "input": "{{sample.output_text}}", "reference": "Answer:",
          "operation": "like"}
RL = {"rollout": {"prompts_per_step": 4, "max_new_tokens": 48},
      "evaluation": {"max_new_tokens": 48, "max_eval_examples": 8, "eval_before_training": False},
      "dataset": {"max_seq_length": 256}}
JOBS = {
    # name: (model, tuneforge sections, what it is)
    "tiny-steps": ("tiny-llama", {"training": {"max_steps": 30, "batch_size": 4}, "evaluation": QUICK_EVAL},
                   "tiny model, 30 steps x 4 packed rows"),
    "tiny-epochs": ("tiny-llama", {"training": {"num_epochs": 2}, "evaluation": QUICK_EVAL},
                    "tiny model, 2 epochs, auto batch"),
    "smollm2-lora": ("smollm2-135m-instruct", {"training": {"max_steps": 32, "batch_size": 2},
                                               "evaluation": {**QUICK_EVAL, "eval_before_training": True}},
                     "SmolLM2-135M LoRA, 32 steps x 2 packed rows, base and final evaluation"),
    "smollm2-full": ("smollm2-135m-instruct", {"adapter": {"type": "full"}, "training": {"max_steps": 32, "batch_size": 2},
                                               "evaluation": QUICK_EVAL},
                     "SmolLM2-135M full fine-tuning, 32 steps x 2 packed rows"),
    "smollm2-epochs": ("smollm2-135m-instruct", {"training": {"num_epochs": 1}, "evaluation": QUICK_EVAL},
                       "SmolLM2-135M LoRA, 1 epoch, auto batch (8 examples)"),
    # Online RL on examples/rl's prompts (configs/grpo and configs/ppo's rollouts and graders).
    "smollm2-grpo": ("smollm2-135m-instruct", {"method": {"type": "reinforcement", "reinforcement": {"grader": FORMAT}},
                                               **RL, "grpo": {"num_generations": 8}, "training": {"max_steps": 3}},
                     "SmolLM2-135M GRPO LoRA, 3 steps x 4 prompts x 8 completions of <= 48 tokens"),
    "smollm2-ppo": ("smollm2-135m-instruct", {"method": {"type": "ppo"}, **RL, "training": {"max_steps": 3},
                                              "rollout": {**RL["rollout"], "graders": [FORMAT]}},
                    "SmolLM2-135M PPO LoRA, 3 steps x 4 prompts, 4 PPO epochs"),
}
# Eval runs (POST /v1/evals/{id}/runs) on json-extraction's 48 validation chats as items: the model answers each
# text, graded by an exact match (string_check), and with a judge the run serves itself (score_model).
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.expected}}",
         "operation": "eq"}
JUDGE = {"type": "score_model", "name": "judge", "model": "smollm2-135m-instruct", "range": [0, 10], "pass_threshold": 5,
         "sampling_params": {"max_completions_tokens": 8},
         "input": [{"role": "user", "content": "Text: {{item.text}}\nExpected: {{item.expected}}\n"
                                               "Answer: {{sample.output_text}}\nScore the answer from 0 to 10."}]}
EVAL_RUNS = {
    "smollm2-eval-run": ([EXACT], 64, "SmolLM2-135M eval run, 48 items, <= 64 tokens each, string_check"),
    "smollm2-eval-judged": ([EXACT, JUDGE], 64, "SmolLM2-135M eval run, 48 items, <= 64 tokens, + a local judge"),
}


def eval_items() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "val.jsonl").read_text().splitlines() if line.strip()]
    return [{"item": {"system": r["messages"][0]["content"], "text": r["messages"][1]["content"],
                      "expected": r["messages"][2]["content"]}} for r in rows]


def create_eval_run(http: httpx.Client, name: str) -> tuple[dict, str]:
    """(the run's cost estimate, the run's path) of a completions run created through the Evals API."""
    criteria, max_tokens, _ = EVAL_RUNS[name]
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in ("system", "text", "expected")}}
    evaluation = http.post("/v1/evals", json={"name": name, "testing_criteria": criteria,
                                              "data_source_config": {"type": "custom", "item_schema": schema}})
    evaluation.raise_for_status()
    run = http.post(f"/v1/evals/{evaluation.json()['id']}/runs", json={"data_source": {
        "type": "completions", "model": "smollm2-135m-instruct", "sampling_params": {"max_completion_tokens": max_tokens},
        "input_messages": {"type": "template", "template": [{"role": "system", "content": "{{item.system}}"},
                                                            {"role": "user", "content": "{{item.text}}"}]},
        "source": {"type": "file_content", "content": eval_items()}}})
    run.raise_for_status()
    return run.json()["tuneforge"]["cost"], f"/v1/evals/{evaluation.json()['id']}/runs/{run.json()['id']}"


def run(names: list[str]) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="tuneforge-cost-bench-"))
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "TUNEFORGE_DATABASE_URL": f"sqlite:///{home / 'tuneforge.db'}"}
    cli = [sys.executable, "-m", "tuneforge.cli"]
    key = subprocess.run([*cli, "keys", "create", "--tenant", "bench"], env=env, check=True, capture_output=True,
                         text=True).stdout.strip()
    port = 18000 + os.getpid() % 1000
    log = open(home / "server.log", "ab")
    server = subprocess.Popen([*cli, "server", "--port", str(port), "--cpu-slots", "1"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    try:
        wait(lambda: _healthy(http), 120, "the server")
        files = {}
        for name, path in (("train", DATA / "train.jsonl"), ("val", DATA / "val.jsonl"),
                           ("rl-train", RL_DATA / "prompts.jsonl"), ("rl-val", RL_DATA / "held_out.jsonl")):
            with open(path, "rb") as handle:
                files[name] = http.post("/v1/files", data={"purpose": "fine-tune"},
                                        files={"file": (path.name, handle)}).json()["id"]
            wait(lambda: http.get(f"/v1/files/{files[name]}").json()["status"] == "processed", 120, f"{name} validated")
        results = []
        for name in names:
            if name in EVAL_RUNS:
                estimate, path = create_eval_run(http, name)
                done = wait(lambda: (r := http.get(path).json())["status"] in ("completed", "failed", "canceled") and r,
                            3600, f"eval run {name}")
                # the job's final cost is written just after its status: wait for it
                cost = wait(lambda: (c := http.get(path).json()["tuneforge"]["cost"])["final"] and c, 60, "its cost")
                results.append({"job": name, "what": EVAL_RUNS[name][2], "basis": estimate["estimate_basis"],
                                "status": "succeeded" if done["status"] == "completed" else done["status"],
                                "estimated_hours": estimate["estimated_gpu_hours"],
                                "estimated_s": estimate["estimated_wall_seconds"], "actual_hours": cost["gpu_hours"],
                                "error": cost.get("estimate_error"), "overhead": cost.get("overhead_fraction")})
                print(_row(results[-1]), flush=True)
                continue
            model, sections, what = JOBS[name]
            sections = dict(sections)
            method = sections.pop("method", None)  # OpenAI's method object (reinforcement is GRPO)
            data = "rl-" if method else ""
            body = {"model": model, "training_file": files[data + "train"], "validation_file": files[data + "val"],
                    "tuneforge": {"dataset": {"max_seq_length": 512}, "resources": {"gpu_type": "cpu"}, **sections}}
            if method:
                body["method"] = method
            created = http.post("/v1/fine_tuning/jobs", json=body)
            created.raise_for_status()
            job = created.json()
            estimate = job["tuneforge"]["cost"]
            done = wait(lambda: (j := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"]
                        in ("succeeded", "failed", "cancelled") and j, 3600, f"job {name}")
            cost = done["tuneforge"]["cost"]
            results.append({"job": name, "what": what, "status": done["status"], "basis": estimate["estimate_basis"],
                            "estimated_hours": estimate["estimated_gpu_hours"], "estimated_s": estimate["estimated_wall_seconds"],
                            "actual_hours": cost["gpu_hours"], "error": cost.get("estimate_error"),
                            "overhead": cost.get("overhead_fraction")})
            print(_row(results[-1]), flush=True)
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def _row(r: dict) -> str:
    error = f"{r['error']:+.0%}" if r["error"] is not None else "-"
    overhead = f"{r['overhead']:.0%}" if r["overhead"] is not None else "-"
    return (f"| {r['what']} | {r['estimated_hours']:.5f} ({r['estimated_s']:.0f} s) | {r['actual_hours']:.5f} "
            f"({r['actual_hours'] * 3600:.0f} s) | {error} | {overhead} | {r['status']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join([*JOBS, *EVAL_RUNS]))
    args = parser.parse_args()
    names = [n for n in args.jobs.split(",") if n]
    unknown = [n for n in names if n not in JOBS and n not in EVAL_RUNS]
    if unknown:
        parser.error(f"unknown jobs {unknown}; choose from {[*JOBS, *EVAL_RUNS]}")
    print("| job | estimated device-hours (wall s) | actual device-hours (wall s) | error | overhead | status |")
    print("|---|---|---|---|---|---|")
    results = run(names)
    errors = [abs(r["error"]) for r in results if r["error"] is not None]
    if errors:
        print(f"mean absolute error {sum(errors) / len(errors):.0%} over {len(errors)} jobs")
    for r in results:
        print(f"{r['job']}: {r['basis']}")
    return 0 if all(r["status"] == "succeeded" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
