"""A cache shared by every session, bounded by the bytes its entries hold, least recently used first out.

Streamlit's own caches bound entries by count; a soup of a 1B-parameter zoo holds 4 GB, so 64
of them (one per ticked set a room tries) would exhaust the server. :class:`ByteBudgetCache`
keeps results until their tensors together pass ``budget_bytes``, then drops the least recently
used. Concurrent requests for one key compute it once (the others wait for it and get its value,
or its error); an entry larger than the whole budget is returned to every waiter and not kept.

>>> cache = ByteBudgetCache(budget_bytes=10)
>>> cache.get_or_make("a", lambda: "x" * 6, size=len), cache.get_or_make("b", lambda: "y" * 6, size=len)
('xxxxxx', 'yyyyyy')
>>> cache.keys()  # a and b together would be 12 bytes: a, the older, went
['b']
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_RETRY = object()  # what waiters get when the request making a value was stopped before it finished


class ByteBudgetCache:
    """Results by key, at most ``budget_bytes`` of them (as ``size`` measures each), LRU first out."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[Hashable, Future] = {}

    def holds(self, key: Hashable) -> bool:
        """Whether ``key``'s result is kept now (without making it or touching its place in line)."""
        with self._lock:
            return key in self._entries

    def get_or_make(self, key: Hashable, make: Callable[[], T], size: Callable[[T], int]) -> T:
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key][0]
                future = self._making.get(key)
                owner = future is None
                if owner:
                    future = self._making[key] = Future()
            if not owner:  # another request is making it: take its result (or its error)
                value = future.result()
                if value is not _RETRY:
                    return value
                continue
            try:
                value = make()
                self._keep(key, value, size(value))
            except Exception as exc:  # the same inputs would fail the same way for every waiter
                future.set_exception(exc)
                raise
            except BaseException:  # stopped, not failed (a Streamlit rerun): a waiter makes it itself
                future.set_result(_RETRY)
                raise
            else:
                future.set_result(value)
                return value
            finally:
                with self._lock:
                    if self._making.get(key) is future:
                        del self._making[key]

    def _keep(self, key: Hashable, value: Any, nbytes: int) -> None:
        if nbytes > self.budget_bytes:
            return
        with self._lock:
            self._entries[key] = (value, nbytes)
            while sum(n for _, n in self._entries.values()) > self.budget_bytes:
                self._entries.popitem(last=False)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    @property
    def bytes_held(self) -> int:
        with self._lock:
            return sum(n for _, n in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def tensor_bytes(state: Mapping[str, torch.Tensor] | None) -> int:
    """Bytes of a state dict's tensors, each storage counted once (tied and aliased tensors too)."""
    if not state:
        return 0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return sum(storages.values())
