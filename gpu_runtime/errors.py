"""Typed errors of the data plane. Each is a ValueError subclass whose message names the
offending value and the allowed range, so a caller (the worker, the API) can pass it on as a 4xx."""

from __future__ import annotations


class RuntimeInputError(ValueError):
    """Base class: bad input to the engine. ``param`` names the field, ``status`` the HTTP code."""

    status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class PromptTooLongError(RuntimeInputError):
    """Prompt (plus at least one generated token) does not fit in the model's context."""


class TokenIdError(RuntimeInputError):
    """A prompt token id outside ``[0, vocab_size)``."""


class SamplingParamsError(RuntimeInputError):
    """A sampling parameter out of its allowed range."""


class UnsupportedModelError(RuntimeInputError):
    """config.json names an architecture or option the runtime does not implement."""


class DuplicateRequestError(RuntimeInputError):
    """``add_request`` with an id that is already running or waiting."""
