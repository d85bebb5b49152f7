"""`python -m finetune`: the same as `bit-finetune`."""

import sys

from .cli import main

sys.exit(main())
