"""Request and response schemas (pydantic) of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat schema; fields we do not use (e.g. `user`) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch generator takes
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's extra sampling parameter: generate max_tokens even past end-of-text (fixed-length benchmarks)
    ignore_eos: bool = False
    # loraforge's: override the adapter's own scope for this request (`all`: the adapter answers whatever is
    # asked; `near`: only questions near its training questions, the base the rest)
    scope: Literal["all", "near"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_code_from_requests(cls, data):
        """A chat template is a Jinja program and trust_remote_code runs Python: neither comes from a request
        (vLLM and others accept `chat_template` per request); the model's own template is used."""
        if isinstance(data, dict):
            for key in ("chat_template", "chat_template_kwargs", "trust_remote_code"):
                if key in data:
                    raise ValueError(f"{key} is not accepted in a request; the model's own chat template is used")
        return data

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise ValueError("logprobs are not available on streamed answers yet; ask without stream")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value
