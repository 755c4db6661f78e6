"""LazySequence: a read-only sequence of arrays made on access (synthetic images and true densities), and
`take_items`, which subsets a list or a LazySequence alike."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np


class LazySequence(Sequence):
    """Read-only sequence of arrays made on access (the sequence keeps none): item i is `load(indices[i])`, passed
    through each step `function(item, arguments[i])` in turn.

    `take` (a subset) and `map` (one more per-item step) return new views without making any item. Pickling copies
    `load` (it must be picklable, e.g. a bound method of a small object), the indices and the step arguments, so
    loader workers (fork or spawn) make the items themselves.
    """

    def __init__(self, load: Callable[[int], np.ndarray], indices: int | Sequence[int],
                 steps: Sequence[tuple[Callable[[np.ndarray, Any], np.ndarray], np.ndarray]] = ()):
        self.load = load
        self.indices = np.arange(indices) if isinstance(indices, int) else np.asarray(indices, np.int64).reshape(-1)
        self.steps = tuple(steps)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        position = operator.index(index)
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} out of range for {len(self)} items")
        position %= len(self)
        item = self.load(int(self.indices[position]))
        for function, arguments in self.steps:
            item = function(item, arguments[position])
        return item

    def __repr__(self) -> str:
        return f"LazySequence({len(self)} items of {self.load!r}, {len(self.steps)} step(s))"

    def take(self, positions: Sequence[int]) -> "LazySequence":
        """The items at `positions` (in that order), still lazy."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        return LazySequence(self.load, self.indices[positions],
                            [(function, arguments[positions]) for function, arguments in self.steps])

    def map(self, function: Callable[[np.ndarray, Any], np.ndarray], arguments: np.ndarray) -> "LazySequence":
        """Item i becomes `function(item, arguments[i])`, still lazy; `arguments` has one entry (row) per item."""
        arguments = np.asarray(arguments)
        if len(arguments) != len(self):
            raise ValueError(f"{len(arguments)} step arguments for {len(self)} items")
        return LazySequence(self.load, self.indices, [*self.steps, (function, arguments)])


def take_items(items: Sequence[np.ndarray], indices: np.ndarray) -> Sequence[np.ndarray]:
    """Items `indices` of a list (a new list of the same arrays) or of a LazySequence (a lazy view)."""
    if isinstance(items, LazySequence):
        return items.take(indices)
    return [items[i] for i in indices]
