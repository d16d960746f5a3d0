"""Long computations that a click may interrupt without losing what they computed.

Streamlit stops a running script when its user clicks anything (Cancel included): the next
``st`` call raises a script-control exception. Raised from inside a progress callback, that
exception would unwind through the landscape engine and throw away every finished chunk.
:class:`Interruptible` catches it there instead, asks the engine to stop between chunks
(``should_stop``), and re-raises it once the caller has kept the partial result.
"""

from __future__ import annotations

from collections.abc import Callable

from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException


class Interruptible:
    """``progress`` and ``should_stop`` for the library's long functions, drawn with ``draw``."""

    def __init__(self, draw: Callable[[float, str], None]) -> None:
        self.draw = draw
        self.pending: ScriptControlException | None = None

    def progress(self, fraction: float, message: str) -> None:
        if self.pending is not None:
            return
        try:
            self.draw(fraction, message)
        except ScriptControlException as exc:  # the user clicked: stop after this chunk
            self.pending = exc

    def should_stop(self) -> bool:
        return self.pending is not None

    def raise_pending(self) -> None:
        """Let Streamlit's stop or rerun go on, now that the partial result is kept."""
        if self.pending is not None:
            raise self.pending
