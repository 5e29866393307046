"""How the console's templates print figures."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from hydraserve.api.console import bp
from hydraserve.billing.cost import decimal_text
from hydraserve.billing.times import iso_utc

MIB = 1 << 20


@bp.app_template_filter("mib")
def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / MIB:,.1f} MiB"


@bp.app_template_filter("ms")
def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f} ms"


@bp.app_template_filter("pct")
def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}%"


@bp.app_template_filter("when")
def when(t: datetime | None) -> str:
    return "–" if t is None else iso_utc(t.replace(microsecond=0))


@bp.app_template_filter("coldwarm")
def coldwarm(cold: bool | None) -> str:
    return "not started" if cold is None else "cold" if cold else "warm"


@bp.app_template_filter("dec")
def dec(value: Decimal) -> str:
    return decimal_text(value)
