import sys

from soup_core.cli import main

sys.exit(main())
