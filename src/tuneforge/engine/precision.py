"""Pick the device and the training precision from the hardware when the spec says auto."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision the hardware cannot train in."""


@dataclass(frozen=True)
class Precision:
    name: str  # fp32, bf16 or fp16
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        """Autocast context for forward passes; a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def resolve_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise PrecisionError("training.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    return Precision(requested, device)
