"""`python -m nmoe.train CONFIG` (what torchrun launches): the same as `nmoe-train CONFIG`."""

import sys

from nmoe.train.cli import main

sys.exit(main())
