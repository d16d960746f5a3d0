"""``python -m soup_core``: the ``soup`` command.

``python -m`` puts the current folder first on ``sys.path``; it is taken off before anything
runs, so a manifest's ``module:function`` never imports a file that happens to lie where the
command was started (manifests name modules beside themselves, or installed ones).
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)

from soup_core.cli import run  # noqa: E402

run()
