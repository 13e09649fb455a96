"""Progress reporting for long loops: a callback type the library takes and its silent default."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
# track(items, description, total) -> the same items, e.g. wrapped in a progress bar (the CLI's)
Track = Callable[[Iterable[T], str, int], Iterable[T]]


def no_progress(items: Iterable[T], description: str, total: int) -> Iterable[T]:
    """The default: the items unchanged, nothing shown."""
    return items
