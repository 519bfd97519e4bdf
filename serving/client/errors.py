"""Server messages and transport failures (gRPC, tritonclient, sockets) as gptpipe exceptions."""

from __future__ import annotations

from typing import Optional

from serving.generation import (
    GptpipeError,
    InvalidParameterError,
    PromptTooLongError,
    ServerBusyError,
    ServerError,
    ServerUnavailableError,
)


def _known_error(message: str) -> Optional[GptpipeError]:
    """The gptpipe exception for a message the gptpipe models send, else None. Checked before
    any transport status: `gpt` refuses a START with gRPC UNAVAILABLE when its pool is full,
    which is "busy", not "unreachable"."""
    low = message.lower()
    if "server busy" in low:
        return ServerBusyError(message)
    if "prompt too long" in low or "context length exceeded" in low:
        return PromptTooLongError(message)
    if "invalid parameter" in low:
        return InvalidParameterError(message)
    return None


def error_from_message(message: str) -> GptpipeError:
    """The gptpipe exception for an error message from the server (the message is kept)."""
    return _known_error(message) or ServerError(message)


def _grpc_error(e: Exception, url: str, timeout: Optional[float], *, start: bool = False) -> GptpipeError:
    import grpc

    code = e.code() if isinstance(e, grpc.RpcError) else None
    details = (e.details() if isinstance(e, grpc.RpcError) else str(e)) or ""
    known = _known_error(details)
    if known is not None:
        return known
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"Triton server at {url} (grpc) is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        hint = (" (a START waits in Triton's queue while every sequence slot is taken: raise timeout_s, "
                "or end idle sequences)") if start else ""
        return ServerUnavailableError(f"no answer from the Triton server at {url} (grpc) within {timeout} s{hint}")
    if code == grpc.StatusCode.CANCELLED:
        return ServerUnavailableError(f"the request to {url} (grpc) was cancelled: {details}")
    return error_from_message(details or str(e))


def _tritonclient_error(e: Exception, url: str, protocol: str) -> GptpipeError:
    """From a tritonclient InferenceServerException or a socket error."""
    if isinstance(e, GptpipeError):
        return e
    if isinstance(e, (ConnectionError, OSError)) and not isinstance(e, TimeoutError):
        return ServerUnavailableError(f"cannot reach the Triton server at {url} ({protocol}): {e}")
    if isinstance(e, TimeoutError):
        return ServerUnavailableError(f"no answer from the Triton server at {url} ({protocol}): {e}")
    message = (e.message() if hasattr(e, "message") and callable(e.message) else str(e)) or ""
    known = _known_error(message)
    if known is not None:
        return known
    status = str(e.status()) if hasattr(e, "status") and callable(e.status) else ""
    if "UNAVAILABLE" in status or "failed to connect" in (message or "").lower():
        return ServerUnavailableError(f"Triton server at {url} ({protocol}) is unavailable: {message}")
    if "DEADLINE_EXCEEDED" in status or "timed out" in (message or "").lower():
        return ServerUnavailableError(f"no answer from the Triton server at {url} ({protocol}): {message}")
    return error_from_message(message or str(e))
