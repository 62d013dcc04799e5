"""`python -m bunny.tiny OUT_DIR [--seed N] [--force]`."""

from bunny.tiny import main

raise SystemExit(main())
