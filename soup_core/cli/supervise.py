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
* SIGINT and SIGTERM sent to the parent are passed on to the child. A terminal's Ctrl-C reaches
  both, so the child takes its first SIGINT or SIGTERM as the interrupt and ignores the next ones
  (its clean-up is never cut short): a second Ctrl-C does not force it; SIGKILL does.
* SIGKILL on the parent kills the child too, a moment later (``PR_SET_PDEATHSIG``: Linux only;
  elsewhere the child runs to its end).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CUT_SHORT = ("the command died of SIGBUS while reading memory-mapped files: most often a checkpoint cut short "
             "while it was read (or a failing disk); rerun once every file is complete, and replace a checkpoint "
             "by renaming a finished copy into place")
_PR_SET_PDEATHSIG = 1
_PASSED_ON = (signal.SIGINT, signal.SIGTERM)


def work_in_child() -> None:
    """Return in a child process that does the command's work; in this one, wait and exit as it did.

    Returns at once, in this process, where there is no ``fork`` (the command then runs unsupervised).
    """
    if not hasattr(os, "fork"):
        return
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # None when the command was started with it closed
        if stream is not None:
            stream.flush()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # inherited as ignored, the kernel would reap the child itself
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PASSED_ON)  # none lost between fork and the handlers
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _die_with(parent)
        return
    for signum in _PASSED_ON:
        signal.signal(signum, _pass_on(child))
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _exit_as(child, _wait(child))


def _pass_on(child: int):
    def handler(signum, frame) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:  # already gone
            pass
    return handler


def _wait(child: int) -> int:
    """The child's exit code (−N: killed by signal N). It is reaped only after SIGINT and SIGTERM stop being
    passed on, so a late signal never reaches a process that took over its pid."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # retried after a signal's handler (PEP 475)
    for signum in _PASSED_ON:
        signal.signal(signum, signal.SIG_IGN)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def _exit_as(child: int, code: int) -> None:
    if code == -signal.SIGBUS:
        if sys.stderr is not None:
            print(("\n" if sys.stderr.isatty() else "") + f"soup: error: {CUT_SHORT}", file=sys.stderr, flush=True)
        os._exit(2)
    if code < 0:  # killed by another signal: die of it too, so a shell or a test sees what the child met
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child's core dump is the one worth keeping
        except (ImportError, ValueError, OSError):
            pass
        if -code != signal.SIGKILL:  # whose action cannot be set, nor caught
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        os._exit(128 - code)  # as a shell reports it, where the signal is ignored (a container's process 1)
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
