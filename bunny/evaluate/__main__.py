import sys

from bunny.evaluate.cli import main

sys.exit(main())
