"""Start-up time of the `soft-peft` command against `import soft_peft`, each in a fresh interpreter.

    python -m benchmarks.cli_startup [--repeats 5]

`soft-peft --help`, `--version` and `eval`/`generate`/`extract --help` import neither torch nor transformers (the
subcommands and the top-level names load on first use), so they should answer in well under a second;
`import soft_peft` is as light, and the first use of a training name (`from soft_peft import SoFTTrainer`) pays for
the stack. Prints a Markdown table of the median and fastest wall time per command, and which heavy modules each one
loaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "trl", "datasets")
# Python code whose process prints the heavy modules it loaded, after running `body`
_PROBE = "import sys\n{body}\nprint('LOADED', ','.join(m for m in {heavy!r} if m in sys.modules))"


def commands() -> dict[str, list[str]]:
    """The measured commands, by label; the console script is included when it is on PATH."""
    python = [sys.executable]
    measured = {
        "python -c pass (the interpreter alone)": [*python, "-c", "pass"],
        "python -m soft_peft.cli --help": [*python, "-m", "soft_peft.cli", "--help"],
        "python -m soft_peft.cli --version": [*python, "-m", "soft_peft.cli", "--version"],
    }
    for name in ("eval", "generate", "extract"):  # a subcommand's help imports its parser only, not the model stack
        measured[f"python -m soft_peft.cli {name} --help"] = [*python, "-m", "soft_peft.cli", name, "--help"]
    script = shutil.which("soft-peft")
    if script:
        measured["soft-peft --version (console script)"] = [script, "--version"]
    measured["python -c 'import soft_peft'"] = [*python, "-c", "import soft_peft"]
    measured["python -c 'from soft_peft import SoFTTrainer'"] = [*python, "-c", "from soft_peft import SoFTTrainer"]
    return measured


def loaded_modules(command: list[str]) -> str:
    """Which of HEAVY the command's process imported (a `-c` command or `-m soft_peft.cli`), or '?' for others."""
    if command[0] != sys.executable:
        return "?"
    if command[1:] == ["-c", "pass"]:
        return "none"
    if command[1] == "-c":
        body = command[2]
    else:  # -m soft_peft.cli ARGS: run the CLI's main in-process, keeping its exit
        body = "from soft_peft.cli import main\nimport contextlib, io\n"
        # A subcommand's `--help` ends in argparse's SystemExit(0), which must not end the probe before it prints
        body += "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        body += f"    main({command[3:]!r})"
    probe = _PROBE.format(body=body, heavy=HEAVY)
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("LOADED"))
    return line.removeprefix("LOADED").strip() or "none"


def time_command(command: list[str], repeats: int) -> list[float]:
    """Wall seconds of `repeats` runs of `command`, each a new process."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Runs per command (after one warm-up run).")
    args = parser.parse_args(argv)
    rows = ["| Command | Median s | Fastest s | Heavy modules loaded |", "|---|---:|---:|---|"]
    for label, command in commands().items():
        time_command(command, 1)  # warm the file cache
        seconds = time_command(command, args.repeats)
        rows.append(
            f"| `{label}` | {statistics.median(seconds):.3f} | {min(seconds):.3f} | {loaded_modules(command)} |"
        )
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"Python {sys.version.split()[0]}, {args.repeats} runs each, OMP_NUM_THREADS={threads}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
