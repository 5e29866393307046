"""Typed errors of the data plane.

``DataPlaneError`` is the one base of every package's errors (engine input, checkpoints, store,
prefetcher, cold start): a class-level HTTP ``status`` the platform maps it to, a ``message``
that names what failed, the value and what is allowed, and the ``param`` it concerns.
"""

from __future__ import annotations


class DataPlaneError(Exception):
    status = 500
    default_param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param if param is not None else self.default_param


class RuntimeInputError(DataPlaneError, ValueError):
    """Base class: bad input to the engine. ``param`` names the field, ``status`` the HTTP code."""

    status = 400


class PromptTooLongError(RuntimeInputError):
    """Prompt (plus at least one generated token) does not fit in the model's context or in
    the KV cache."""


class TokenIdError(RuntimeInputError):
    """A prompt token id outside ``[0, vocab_size)``."""


class SamplingParamsError(RuntimeInputError):
    """A sampling parameter out of its allowed range."""


class UnsupportedModelError(RuntimeInputError):
    """config.json names an architecture or option the runtime does not implement."""


class DuplicateRequestError(RuntimeInputError):
    """``add_request`` with an id that is already running or waiting."""
