"""Keep library chatter (weight-loading bars, deprecation notices) out of a training run's terminal.

Our own progress display and events say what is happening; transformers' per-file progress bars and
bitsandbytes' optional-kernel notices do not help a user and bury the lines that do.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    import transformers

    import torch

    # transformers imports DeepSpeed (when installed) while it loads a model; on a machine without a GPU
    # DeepSpeed then warns that it fell back to its CPU accelerator. Naming it up front is the same choice.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # bitsandbytes' int8 matmul says on every call that it casts to float16; once per job is plenty.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
    for module in ("transformers", "peft", "torch", "accelerate", "trl"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
