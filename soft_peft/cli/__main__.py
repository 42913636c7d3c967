"""`python -m soft_peft.cli ...` runs the `soft-peft` command."""

import sys

from . import main

sys.exit(main())
