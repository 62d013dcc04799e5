"""``python -m bunny.merge``."""

import sys

from bunny.merge.cli import main

sys.exit(main())
