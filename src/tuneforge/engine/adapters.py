"""Make a loaded base model trainable: a LoRA / QLoRA adapter with PEFT, or every weight for full fine-tuning."""

from __future__ import annotations

from tuneforge.spec.job import AdapterSpec, JobSpec


def make_trainable(model, adapter: AdapterSpec, *, quantized: bool, gradient_checkpointing: bool,
                   task_type: str = "CAUSAL_LM"):
    """Return the model to train: a PeftModel for lora/qlora, the model itself for full. task_type SEQ_CLS
    (a reward model) also trains the classification head whole (PEFT's modules_to_save)."""
    checkpointing_kwargs = {"use_reentrant": False}
    if adapter.type == "full":
        model.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model.requires_grad_(False)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        bias="none",
        task_type=task_type,
    )
    return get_peft_model(model, config)


def trainable_model(model, spec: JobSpec, *, task_type: str = "CAUSAL_LM"):
    """make_trainable with what a job spec says: its adapter, its base's quantization, its checkpointing."""
    return make_trainable(model, spec.adapter, quantized=spec.model.quantization != "none",
                          gradient_checkpointing=spec.training.gradient_checkpointing, task_type=task_type)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they pack."""
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", None) or parameter.numel()  # ZeRO-3 partitions hold ds_numel
        if hasattr(parameter, "quant_state"):  # bitsandbytes Params4bit packs two values per byte
            count *= 2 * parameter.element_size()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
