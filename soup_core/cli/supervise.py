"""The ``soup`` command does its work in a child process, so a checkpoint cut short under it is one line.

Commands that score read their checkpoints memory-mapped: an ingredient costs page cache, not
anonymous memory. The price is a signal no Python code can catch. A file truncated while mapped --
``cp new.safetensors ft-05.safetensors`` truncates ``ft-05`` before it writes -- makes the next read
of a page past its new end raise SIGBUS, and the process dies with nothing but "Bus error".

:func:`work_in_child` forks. The child returns and runs the command as if nothing happened; the
parent waits and exits as the child did, except that a death by SIGBUS becomes ``soup: error: ...``
and exit code 2. Outputs are written staged (:mod:`soup_core.io.weights_out`), so the dead child
leaves no half file. The parent imports nothing heavy (torch loads in the child only).

Pitfalls, where a user meets them:

* ``ps`` shows two ``soup`` processes; the child does the work (its memory is the command's).
* Ctrl-C reaches the child through the terminal's process group, so the parent ignores SIGINT
  (forwarding it too would interrupt the child's clean-up). To stop a command from a script, send
  SIGTERM to either process, or SIGINT to the child or the group.
* SIGKILL on the parent kills the child too (``PR_SET_PDEATHSIG``), a moment later.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CUT_SHORT = ("a memory-mapped checkpoint became unreadable while this command read it (SIGBUS: the file was cut "
             "short, or its disk failed); rerun once every file is complete, and replace a checkpoint by renaming a "
             "finished copy into place")
_PR_SET_PDEATHSIG = 1


def work_in_child() -> None:
    """Return in a child process that does the command's work; in this one, wait and exit as it did.

    Returns at once, in this process, where there is no ``fork`` (the command then runs unsupervised).
    """
    if not hasattr(os, "fork"):
        return
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _die_with(parent)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)  # retried after a signal's handler (PEP 475)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the child is reaped: its pid is no longer ours to signal
    code = os.waitstatus_to_exitcode(status)
    if code == -signal.SIGBUS:
        print(f"soup: error: {CUT_SHORT}", file=sys.stderr, flush=True)
        os._exit(2)
    if code < 0:  # killed by another signal: die of it too, so a shell or a test sees what the child met
        if -code != signal.SIGKILL:  # whose action cannot be set, nor caught
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _die_with(parent: int) -> None:
    """The child is killed when the parent dies, even by SIGKILL (Linux; elsewhere the child runs on)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
