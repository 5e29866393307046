"""Link contention: a node's link of bandwidth B is split evenly among its active fetches.

A new fetch may join a link only if every fetch already on it still meets its deadline with one
more sharer. Pure functions over immutable state, so the planner can be tested exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reservation:
    """A fetch on a node's link: bytes still to move and seconds left until its deadline."""

    bytes_left: int
    seconds_left: float

    def __post_init__(self) -> None:
        assert self.bytes_left >= 0, f"negative bytes_left {self.bytes_left}"


@dataclass(frozen=True, slots=True)
class Link:
    bytes_per_s: float
    fetches: tuple[Reservation, ...] = ()

    def __post_init__(self) -> None:
        if self.bytes_per_s <= 0:
            raise ValueError(f"link bandwidth must be positive, got {self.bytes_per_s}")

    def share_with_one_more(self) -> float:
        """Bandwidth each fetch gets once a new one joins."""
        return self.bytes_per_s / (len(self.fetches) + 1)

    def admits_one_more(self) -> bool:
        """True when every existing fetch still meets its deadline at the reduced share."""
        share = self.share_with_one_more()
        return all(r.bytes_left / share <= r.seconds_left for r in self.fetches)

    def with_fetch(self, reservation: Reservation) -> "Link":
        return Link(self.bytes_per_s, (*self.fetches, reservation))
