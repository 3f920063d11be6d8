"""What sealing a job's checkpoints at rest costs on SmolLM2-135M: a LoRA checkpoint and a full fine-tuning
checkpoint (weights + AdamW state), each written by tuneforge's own save, then sealed in place and unsealed
again as the worker does between runs (registry/storage/job_files.py). Compared with the save itself.

    .venv/bin/python bench/seal_cost.py [--only lora|full]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

def measure(adapter_type: str, workdir: Path) -> dict:
    from tuneforge.data.batching import collate
    from tuneforge.data.templating import TokenizedExample
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.engine.adapters import make_trainable
    from tuneforge.engine.base_models import resolve_base_model
    from tuneforge.engine.checkpoint import checkpoint_bytes, save_training_checkpoint
    from tuneforge.engine.loss import CausalLMLoss
    from tuneforge.engine.model_loading import load_base_model
    from tuneforge.engine.optim import build_optimizer, build_scheduler
    from tuneforge.engine.precision import resolve_precision
    from tuneforge.engine.train_step import optimizer_step
    from tuneforge.registry.storage import job_files
    from tuneforge.registry.storage.keys import FolderKeyProvider
    from tuneforge.spec.job import AdapterSpec, ModelSpec, TrainingSpec

    precision = resolve_precision("fp32", torch.device("cpu"))
    model = load_base_model(resolve_base_model("smollm2-135m-instruct"), ModelSpec(), precision,
                            full_finetune=adapter_type == "full")
    model = make_trainable(model, AdapterSpec(type=adapter_type), quantized=False, gradient_checkpointing=False)
    training = TrainingSpec(learning_rate=1e-4)
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training, 10)
    ids = list(range(100, 164))
    optimizer_step(CausalLMLoss(model), [collate([TokenizedExample(ids, ids, 1)], pad_id=2)], optimizer=optimizer,
                   scheduler=scheduler, scaler=None, precision=precision, max_grad_norm=1.0,
                   parameters=[p for p in model.parameters() if p.requires_grad])
    job_dir = workdir / adapter_type
    started = time.perf_counter()
    path = save_training_checkpoint(job_dir / "checkpoints", 1, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=None, trainer_state={"metrics": {}})
    saved = time.perf_counter() - started
    size = checkpoint_bytes(path)
    del model, optimizer
    db = Database(f"sqlite:///{workdir / 'db.sqlite'}")
    upgrade(db.engine)
    keys = FolderKeyProvider(workdir / "keys")
    report = job_files.seal_job_dir(db, keys, tenant_id="bench", job_id=f"job_{adapter_type}", job_dir=job_dir)
    started = time.perf_counter()
    job_files.unseal_job_dir(db, keys, tenant_id="bench", job_id=f"job_{adapter_type}", job_dir=job_dir)
    unsealed = time.perf_counter() - started
    db.dispose()
    shutil.rmtree(job_dir)
    return {"type": adapter_type, "bytes": size, "save_s": round(saved, 3), "seal_s": round(report.seconds, 3),
            "unseal_s": round(unsealed, 3), "seal_MB_per_s": round(size / 1e6 / report.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("lora", "full"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [args.only] if args.only else ["lora", "full"]:
            print(json.dumps(measure(kind, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
