"""The ``soup`` command (also ``python -m soup_core``); ``soup --help`` lists the commands.

Arguments are parsed before anything heavy is imported (:mod:`~soup_core.cli.arguments`), so
``--help`` and argument errors answer at once; torch and the library load when a command
(:mod:`~soup_core.cli.commands`) runs. The ``make`` flags come from the parameters the recipes
declare (:mod:`soup_core.recipes`). Bad input ends with exit code 2 and one line on stderr
(``soup: error: ...``), never a traceback, and never changes a file.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from soup_core.cli.arguments import build_parser
from soup_core.errors import SoupError


def _interrupt(signum, frame) -> None:
    """SIGINT or SIGTERM: unwind like Ctrl-C (temp files are removed, outputs stay as they were), once.
    A terminal's Ctrl-C reaches the command and its worker, which passes it on too: later signals
    must not cut the clean-up short."""
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SoupError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"soup: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soup: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``soup`` command: the work runs in a child (a checkpoint cut short under it is one line:
    :mod:`~soup_core.cli.supervise`); that process is ours, so freed memory stays for reuse
    (landscapes page-fault without it; see :mod:`soup_core.allocator`), and SIGTERM unwinds like Ctrl-C, once."""
    from soup_core.allocator import keep_freed_memory
    from soup_core.cli.supervise import work_in_child
    work_in_child()
    keep_freed_memory()
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _interrupt)
    sys.exit(main())


if __name__ == "__main__":
    run()
