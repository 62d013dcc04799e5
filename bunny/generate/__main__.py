import sys

from bunny.generate.cli import main

sys.exit(main())
