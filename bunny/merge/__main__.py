"""``python -m bunny.merge``: exits without the interpreter's teardown (``exit_now``)."""

from bunny.cli import exit_now
from bunny.merge.cli import main

exit_now(main())
