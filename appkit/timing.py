"""Server-side timing of every script run, off unless ``SOUP_TIMING_LOG`` names a file.

One JSON line per run: when, which session, which page, which widgets changed since that
session's previous run (the action that caused it), how long it took and how it ended
(``ok``, ``rerun``/``stop`` when Streamlit interrupted it, ``error``). ``bench/bench_workshop.py``
reads it to tell the server's own cost from what the browsers observe.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, ScriptControlException

_WRITE = threading.Lock()
_SNAPSHOT = "timing:widgets"
_PLAIN = (bool, int, float, str)


def _widget_values() -> dict[str, object]:
    values = {}
    for key in st.session_state:
        value = st.session_state[key]
        if isinstance(key, str) and not key.startswith(("workspace:", "timing:")) and isinstance(value, _PLAIN):
            values[key] = value
    return values


def timed_fragment(page: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Under ``@st.fragment``: log the fragment's own reruns (a tick reruns only its fragment; a
    whole-page run is logged by :func:`timed_run` already)."""
    def decorate(function: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(function)
        def run() -> None:
            ctx = get_script_run_ctx()
            if ctx is None or not ctx.fragment_ids_this_run:
                function()
            else:
                timed_run(function, f"{page} · {function.__name__}")
        return run
    return decorate


def timed_run(run: Callable[[], None], page: str) -> None:
    """``run()`` (the page), logged when SOUP_TIMING_LOG is set."""
    path = os.environ.get("SOUP_TIMING_LOG")
    if not path:
        run()
        return
    now = _widget_values()
    before = st.session_state.get(_SNAPSHOT, {})  # as the previous run left them
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    ctx = get_script_run_ctx()
    outcome, start = "ok", time.perf_counter()
    try:
        run()
    except RerunException:
        outcome = "rerun"
        raise
    except ScriptControlException:
        outcome = "stop"
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        st.session_state[_SNAPSHOT] = _widget_values()
        record = {"time": time.time(), "session": ctx.session_id if ctx else None, "page": page,
                  "changed": changed, "seconds": round(time.perf_counter() - start, 4), "outcome": outcome}
        with _WRITE, open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
