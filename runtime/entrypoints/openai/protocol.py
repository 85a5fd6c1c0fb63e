"""Request bodies of the OpenAI API (pydantic) and the OpenAI error body.

Bodies are validated strictly from JSON: a string where a number belongs is
a 400, not a silent conversion. Unknown fields are ignored with a warning, as
vLLM does, but OpenAI fields this server does not implement (tools,
response_format, logit_bias, suffix, ...) are refused when set, so a client
never gets an answer that silently ignored what it asked for.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)

# Most top logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20


class OpenAIError(Exception):
    """An error the client caused (or 5xx); rendered as the OpenAI error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
                 err_type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type or _default_type(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.code}}


def _default_type(status: HTTPStatus) -> str:
    return {
        HTTPStatus.BAD_REQUEST: "BadRequestError",
        HTTPStatus.UNAUTHORIZED: "AuthenticationError",
        HTTPStatus.NOT_FOUND: "NotFoundError",
        HTTPStatus.METHOD_NOT_ALLOWED: "MethodNotAllowedError",
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
        HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
    }.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _warn_unknown_fields(self):
        if self.model_extra:
            logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
        return self

    def refuse_unsupported(self, fields: dict[str, Any]) -> None:
        """400 for an OpenAI field we do not implement, unless it has its neutral value."""
        for name, neutral in fields.items():
            value = getattr(self, name, None)
            if value is not None and value != neutral:
                raise OpenAIError(f"'{name}' is not supported by this server; leave it out",
                                  param=name)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


StopType = str | list[str] | None


class SamplingFields(OpenAIBaseModel):
    """Fields completions and chat share (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    seed: int | None = None
    stop: StopType = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling extensions (the openai client sends them via extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's chat extensions.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    chat_template: str | None = None


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


def _field_path(loc: tuple) -> list[str]:
    """The field path of an error location, without the union member tags
    pydantic adds (`prompt.list[int].0` -> `prompt.0`)."""
    path = []
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif part.isidentifier() and part not in _TYPE_TAGS:
            path.append(part)
    return path


_UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def describe_validation_error(exc) -> tuple[str, str | None]:
    """One readable line (and the offending top-level field) from a validation error."""
    # pydantic's ValidationError, or FastAPI's RequestValidationError (no kwargs).
    errors = list(exc.errors())
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    path = _field_path(tuple(first.get("loc", ())))
    if path and path[0] in _UNION_HINTS and first.get("type") != "missing":
        # A union's errors name each member in turn; say what the field accepts.
        return f"{path[0]} must be {_UNION_HINTS[path[0]]}", path[0]
    where = ".".join(path) or "request body"
    fields = {tuple(_field_path(tuple(e.get("loc", ())))[:1]) for e in errors}
    more = " (and errors in other fields)" if len(fields) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", (path[0] if path else None)
