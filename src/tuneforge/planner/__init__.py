"""Memory and throughput planner: will a fine-tuning job fit its GPUs, and how long will it take.

Pure Python on purpose (no torch, no transformers): the API calls `plan_job` at job submission.
"""

from tuneforge.planner.errors import PlannerError
from tuneforge.planner.hardware import GPUS, device
from tuneforge.planner.memory import MemoryEstimate, estimate_memory
from tuneforge.planner.models import PRESETS, ModelArch, arch_from_config, load_model_arch
from tuneforge.planner.plan import Alternative, Plan, plan, plan_job, setup_from_job
from tuneforge.planner.setup import TrainingSetup
from tuneforge.planner.throughput import Throughput, estimate_throughput

__all__ = [
    "GPUS",
    "PRESETS",
    "Alternative",
    "MemoryEstimate",
    "ModelArch",
    "Plan",
    "PlannerError",
    "Throughput",
    "TrainingSetup",
    "arch_from_config",
    "device",
    "estimate_memory",
    "estimate_throughput",
    "load_model_arch",
    "plan",
    "plan_job",
    "setup_from_job",
]
