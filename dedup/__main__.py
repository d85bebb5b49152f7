"""`python -m dedup`: the same as `bit-dedup`."""

import sys

from .cli import main

sys.exit(main())
