"""A value made from one set of params, kept while those params live: the data-parallel sampler's decode layout."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import jax


class KeptForParams:
    """Holds `make(params)` for the next call with the same params.

    The same leaf objects, not equal values: params are immutable arrays, and
    every training step makes new ones, which must not meet a stale copy. Weak
    references hold the leaves, and any leaf's death drops the kept value, so it
    never outlives the caller's params.
    """

    def __init__(self):
        self.entry: tuple | None = None  # (treedef, weak refs to the leaves, the value, an id of this entry)

    def get(self, params: Any, make: Callable[[Any], Any]) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        kept = self.entry
        if kept is not None and kept[0] == treedef and all(r() is x for r, x in zip(kept[1], leaves, strict=True)):
            return kept[2]
        self.entry = None
        value = make(params)
        me, entry = weakref.ref(self), object()

        def drop(_):
            # Only this entry's own value: a callback of params replaced earlier may fire later.
            holder = me()
            if holder is not None and holder.entry is not None and holder.entry[3] is entry:
                holder.entry = None

        try:
            refs = tuple(weakref.ref(x, drop) for x in leaves)
        except TypeError:  # a leaf that takes no weak reference (a Python number): nothing kept
            return value
        self.entry = (treedef, refs, value, entry)
        return value
