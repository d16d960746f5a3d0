"""Admission control: the server's expensive work runs in a bounded number of slots, first come
first served, shared by every session.

Thirty participants pressing Compute at once would otherwise start thirty landscapes on a few
cores, each as slow as all of them together. With ``SOUP_HEAVY_SLOTS`` slots (default: one per
two cores), the rest wait in line and see their place in it; leaving the page or pressing
Cancel while waiting or computing gives the place or the slot to the next in line (Streamlit
interrupts a run at its next call to ``st``, and the slot is released on the way out).

>>> pool = Admission(slots=1)
>>> with pool.admitted():
...     pool.running
1
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

WAIT_POLL_SECONDS = 0.5


def default_slots() -> int:
    try:
        return max(1, int(os.environ["SOUP_HEAVY_SLOTS"]))
    except (KeyError, ValueError):
        return max(1, (os.cpu_count() or 2) // 2)


class Admission:
    """At most ``slots`` holders at once; the others wait in arrival order."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running = 0
        self._line: list[object] = []
        self._changed = threading.Condition()
        self._held = threading.local()  # a holder's nested heavy work runs in its own slot

    def waiting(self) -> int:
        with self._changed:
            return len(self._line)

    @contextlib.contextmanager
    def admitted(self, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Hold a slot for the body. While waiting, ``on_wait(ahead)`` is called with how many
        are ahead in line (or running) whenever that changes; if it raises (a Streamlit rerun
        or stop), the place in line is given up and the exception goes on."""
        if getattr(self._held, "depth", 0):
            self._held.depth += 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        ticket = object()
        with self._changed:
            self._line.append(ticket)
        shown = None
        try:
            while True:
                with self._changed:
                    place = self._line.index(ticket)
                    if place == 0 and self.running < self.slots:
                        self._line.pop(0)
                        self.running += 1
                        break
                    ahead = max(1, place + self.running - self.slots + 1)
                    if on_wait is None or ahead == shown:
                        self._changed.wait(WAIT_POLL_SECONDS)
                        continue
                shown = ahead
                on_wait(ahead)  # outside the lock: it draws, and may raise
        except BaseException:
            with self._changed:
                if ticket in self._line:
                    self._line.remove(ticket)
                self._changed.notify_all()
            raise
        self._held.depth = 1
        try:
            yield
        finally:
            self._held.depth = 0
            with self._changed:
                self.running -= 1
                self._changed.notify_all()


HEAVY_WORK = Admission(default_slots())
