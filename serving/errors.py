"""The exceptions gptpipe raises on purpose (serving.generation re-exports them)."""

from __future__ import annotations


class GptpipeError(Exception):
    """Base of every error gptpipe raises on purpose."""


class InvalidParameterError(GptpipeError, ValueError):
    """A generation argument is out of range; the message names the field and the limit."""


class PromptTooLongError(InvalidParameterError):
    """prompt + max_new_tokens does not fit in the model's context (n_positions)."""


class ServerBusyError(GptpipeError):
    """Every KV-cache slot of the server is taken ("server busy: ...")."""


class ServerUnavailableError(GptpipeError):
    """The server cannot be reached, or went away during a generation."""


class ServerError(GptpipeError):
    """Any other error the server reported; carries the server's message."""
