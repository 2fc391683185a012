"""The OpenAI API's shapes: request bodies (pydantic, validated by FastAPI), responses, chunks and errors."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What /v1/completions and /v1/chat/completions share. Unknown fields are ignored, as OpenAI's are by
    servers that do not implement them; `budget`, `ignore_eos` and `return_token_ids` are this server's own."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    budget: float | str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n not in (None, 1):
            raise ValueError(f"only n=1 is supported (one choice per request), got {n}; send {n} requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @field_validator("budget")
    @classmethod
    def _budget(cls, budget):
        if isinstance(budget, bool):
            raise ValueError("budget must be a fraction in (0, 1], a size such as '60M', or 'mem:...'/'tps:...'")
        return budget


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt is empty: give a string or a list of token ids")
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---- responses ----
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(rid: str, model: str, text: str | None, finish: str | None, extra: dict, chat: bool,
                    chunk: bool = False, role: bool = False, token_ids: list[int] | None = None) -> dict:
    """A completion, a chat completion, or one streamed chunk of either."""
    if chat:
        content = {"role": "assistant"} if role or not chunk else {}
        if text is not None:
            content["content"] = text
        choice = {"index": 0, ("delta" if chunk else "message"): content, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice], **extra}


__all__ = ["APIError", "ChatRequest", "CompletionRequest", "completion_body", "error_body", "new_id", "usage"]
