"""The Exports API's request and response shapes: the choices are those of `tuneforge export` and deploy:."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.spec.job import DeploySpec

ExportStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]


class ExportCreateRequest(BaseModel):
    """POST /v1/models/{model_id}/exports: what deploy: in a job spec says, for a model that exists."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["auto", "adapter", "merged", "gguf"] = Field(
        "auto", description="auto: gguf for llama.cpp, merged for a fully fine-tuned model, else the adapter.")
    target: Literal["vllm", "sglang", "tgi", "llama.cpp"] | None = Field(
        None, description="The server (default: llama.cpp for format gguf, else vllm).")
    fallback: Literal["none", "merged"] = DeploySpec.model_fields["fallback"]
    gguf_type: Literal["f16", "q8_0"] | None = DeploySpec.model_fields["gguf_type"]
    gpu_type: Literal["t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "b200"] | None = \
        DeploySpec.model_fields["gpu_type"]


class ExportObject(BaseModel):
    id: str
    object: Literal["model.export"] = "model.export"
    model: str
    created_at: int
    finished_at: int | None = None
    status: str
    format: str = Field(description="As asked (auto resolved); merged when an adapter fell back to it.")
    target: str
    error: dict[str, Any] | None = None
    fallback_from: list[str] | None = Field(None, description="The server rules the adapter broke, when it was merged.")
    checks: dict[str, Any] | None = Field(None, description="What the export verified (server rules, merge, GGUF).")
    descriptor: dict[str, Any] | None = Field(
        None, description="serve.json with the server's paths replaced: files of the export are named relative to "
        "the downloaded archive's root, an adapter's base model is $BASE_MODEL (see placeholders).")
    placeholders: dict[str, str] = Field(default_factory=dict, description="What each placeholder in the commands stands for.")
    origin: Literal["export_job", "deploy"] = Field(
        "export_job", description="export_job: made by POST /v1/models/{model_id}/exports; deploy: by deploy: in the "
        "spec of the job that trained the model, when that job succeeded.")
    source: dict[str, Any] | None = Field(
        None, description="The model version the export was made from: model, name, version (v2), version_id, "
        "manifest_sha256 and the base model it was trained on (as recorded when the export succeeded).")
    lineage: dict[str, Any] | None = Field(
        None, description="The export's lineage in the registry, once it succeeded: source, choices, checks, the "
        "SHA-256 of its files' manifest, their count and bytes, the chat template's hash, the library versions; "
        "what `tuneforge models lineage EXPORT_ID` prints.")
