"""One exception type for every error the frontend answers, and its OpenAI wire format.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status; never FastAPI's
``{"detail": ...}`` and never 422. Errors from the gptpipe client map here too, once.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from serving import (
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerUnavailableError,
)

# How long a client should wait before retrying a busy or unreachable backend.
RETRY_AFTER_S = 1


class OpenAIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> str:
        """The error as one server-sent event (after a stream has started)."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: Optional[str], code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def not_supported(param: str, what: str = "") -> OpenAIError:
    return bad_request(f"{param}{' ' + what if what else ''} is not supported by this server", param,
                       "unsupported_parameter")


def unknown_model(model: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def context_length_exceeded(*, prompt_tokens: int, max_tokens: int, limit: int, param: str,
                            max_tokens_field: str = "max_tokens", at_least: bool = False) -> OpenAIError:
    """at_least: prompt_tokens is a lower bound (a prompt refused by its size, not tokenized)."""
    more = "at least " if at_least else ""
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{more}{prompt_tokens + max_tokens} tokens ({more}{prompt_tokens} in the {param}, {max_tokens} in "
        f"{max_tokens_field}). Please reduce the length of the {param} or {max_tokens_field}.",
        param, "context_length_exceeded")


# gptpipe's own messages start with the field they are about ("temperature must be ...")
def _param_of(message: str, fields: Iterable[str]) -> Optional[str]:
    first = message.removeprefix("invalid parameter: ").split(" ", 1)[0].split("[", 1)[0]
    return first if first in set(fields) else None


# the client's argument names -> this API's field names
CLIENT_FIELDS = {"max_new_tokens": "max_tokens", "random_seed": "seed"}


def from_client_error(e: GptpipeError, *, fields: Sequence[str] = ()) -> OpenAIError:
    """The OpenAIError for an exception of the gptpipe client."""
    message = str(e)
    for ours, theirs in CLIENT_FIELDS.items():
        message = message.replace(ours, theirs)
    if isinstance(e, PromptTooLongError):
        return bad_request(message, "prompt", "context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return bad_request(message, _param_of(message, fields))
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(e, ServerBusyError):
        return OpenAIError(503, f"every KV-cache slot stayed taken past the queue timeout: {message}",
                           type="server_busy", code="server_busy", headers=retry)
    if isinstance(e, ServerUnavailableError):
        return OpenAIError(503, f"the Triton server is unavailable: {message}", type="server_unavailable",
                           code="backend_unavailable", headers=retry)
    return OpenAIError(500, f"the Triton server failed: {message}", type="server_error", code="backend_error")


def from_validation_errors(errors: Sequence[dict[str, Any]], fields_of: Any) -> OpenAIError:
    """A 400 from pydantic's first error: the field's dotted path, what is wrong, and for an
    unknown field the closest valid name. ``fields_of(loc)`` gives the valid names at a path."""
    error = errors[0]
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if error.get("type") == "extra_forbidden" and loc:
        valid = fields_of(tuple(error["loc"][:-1]))
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return bad_request(f"Unrecognized request argument supplied: {param}{hint}", param, "unknown_parameter")
    if error.get("type") == "missing":
        return bad_request(f"{param} is required", param, "missing_required_parameter")
    got = error.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    return bad_request(f"{param}: {error.get('msg', 'invalid value')} (got {shown})", param, "invalid_value")
