"""OpenAI's request shapes for /v1/completions and /v1/chat/completions (the fields moegpt
honours; others a client sends are accepted and ignored, as OpenAI-compatible servers do),
and the error body.

Types are strict, as JSON types: a boolean field takes only ``true``/``false`` and an integer
field only a JSON integer (``"max_tokens": true`` and ``"stream": "yes"`` are 400s), while a
float field still takes an integer (``"temperature": 1``), as OpenAI's API does. Text fields
refuse lone surrogates (``"\\ud800"`` is valid JSON but not Unicode: it can be neither
tokenized nor echoed back in UTF-8)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 16  # samples per request
# Stop strings are checked against the generated text after every token, so their number and
# length bound each step's work (OpenAI allows 4; 16 leaves room for clients that send more).
MAX_STOPS = 16
MAX_STOP_CHARS = 256

_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text: str) -> str:
    found = _SURROGATE.search(text)
    if found is not None:
        raise PydanticCustomError(
            "unicode",
            "contains a lone surrogate ({code}) at character {at}: not valid Unicode",
            {"code": f"\\u{ord(found.group()):04x}", "at": found.start()},
        )
    return text


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _text_or_ids(value: Any) -> str:
    return "text" if isinstance(value, str) else "ids"


Text = Annotated[str, AfterValidator(_unicode)]
StopText = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]
# One string or a list of them; checked as a list, so an error names the string at fault.
Stops = Annotated[list[StopText], BeforeValidator(_listed), Field(max_length=MAX_STOPS)]
# Text or token ids: the value's JSON type picks the branch, so its errors are that branch's
# alone ("text" and "ids" are tags the error handler leaves out of a field's path).
Prompt = Annotated[
    Annotated[Text, Tag("text")] | Annotated[list[int], Tag("ids")], Discriminator(_text_or_ids)
]
UNION_TAGS = ("text", "ids")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: Text
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension vLLM also accepts
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: Stops | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> Any:
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid", "only allowed when stream is true")
        return options

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Request):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:  # refused, not ignored: a scoring client would read the wrong numbers
            raise PydanticCustomError(
                "unsupported", "echoing the prompt is not supported; moegpt eval scores prompts"
            )
        return echo


class ImageURL(_Strict):
    url: str  # a data: URL (base64 PNG or JPEG); the server fetches nothing
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid", "only allowed when logprobs is true")
        return top


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
