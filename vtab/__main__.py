"""`python -m vtab`: the same as `bit-vtab`."""

import sys

from .cli import main

sys.exit(main())
