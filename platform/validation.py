"""Request-validation pieces every domain's schemas use: strict bodies, text Postgres can
store, and the one name rule of functions and tenants."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from hydraserve.errors import InvalidRequest

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = ("1-63 characters: lower-case letters, digits, '.', '_' or '-', starting with a "
             "letter or digit")
NAME_PARAM = {"type": "string", "pattern": NAME_PATTERN}  # a name in a path, for OpenAPI


def check_name(value: str, param: str, what: str) -> str:
    """``value`` if it is a valid function or tenant name, else a 400 naming the rule."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidRequest(f"{what} {value!r} is not a valid name; use {NAME_RULE}", param)
    return value


def _storable(value: str) -> str:
    # Postgres text and jsonb cannot hold U+0000, and UTF-8 cannot hold a lone surrogate (JSON's
    # "\ud800" escape decodes to one): refuse both here rather than fail on insert.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode: a lone surrogate (\\u{ord(value[exc.start]):04x}) "
                         f"at character {exc.start}") from None
    return value


Text = Annotated[str, AfterValidator(_storable)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_storable)]


class Strict(BaseModel):
    """A request body: unknown fields are refused, and types are strict (``true`` is not 1,
    ``"yes"`` is not a boolean)."""

    model_config = ConfigDict(extra="forbid", strict=True)
