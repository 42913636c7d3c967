"""`soft-peft train --config recipe.yaml [overrides]`: SoFT fine-tuning, the same parser and code path as
`examples/*.py`.

One process by default; for several, launch it through accelerate:

```bash
soft-peft train --config recipes/smollm2_135m_alpaca_cpu.yaml --max_steps 20
accelerate launch --config_file recipes/accelerate/ddp.yaml -m soft_peft.cli.train --config recipes/<recipe>.yaml
```
"""

from __future__ import annotations

import sys

from ..scripts.train import main as _train_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run `soft-peft train` with `argv` (default `sys.argv[1:]`); returns the exit code (2 for user errors)."""
    return _train_main(argv, prog="soft-peft train")


if __name__ == "__main__":
    sys.exit(main())
