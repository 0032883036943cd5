"""`python -m lcdfast ...` (and `torchrun ... -m lcdfast ...`): the `lcdfast` command."""

import sys

from .cli import main

sys.exit(main())
