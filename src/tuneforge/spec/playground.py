"""The playground's OpenAI-compatible request and response shapes (`/v1/chat/completions`, `/v1/completions`).

One definition for both doors: `tuneforge serve` (export/playground.py) validates with it, and so does the
API of `tuneforge server` (api/routers/inference.py) before a request reaches its playground process, so a
bad request is refused with the same 400 either way. Parameters the playground does not implement are
refused (extra="forbid"), never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_NEW_TOKENS = 4096


class PlaygroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="The model to answer: a base model, a fine-tuned model id (ft:...), "
                                        "or a registered version NAME@vN / NAME:ALIAS.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = Field(None, description='{"include_usage": true}: a last chunk with the usage.')
    seed: int | None = None
    n: Literal[1] = 1

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(part.get("text", "") for part in self.content)


class ChatRequest(PlaygroundRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class CompletionRequest(PlaygroundRequest):
    prompt: str
    echo: bool = False

    def max_new_tokens(self) -> int:
        return self.max_tokens or 16


# ---- responses (documented shapes; streamed answers are text/event-stream chunks of the same objects) ----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
