"""Equal-budget quality study of the SoFT controls (issue 13): SFT, uniform SoFT and variants on SmolLM2-135M-Instruct
and GSM8K, per exit, against SFT. Resumable across sessions; results are small JSON files committed in the repository.

    python -m benchmarks.quality_study list                                   # the runs and their flags
    OMP_NUM_THREADS=1 python -m benchmarks.quality_study run --max_steps 100 --runs sft,uniform --core 0
    python -m benchmarks.quality_study run --max_steps 100 --runs ramp_all,rotate2 --core 1   # a second process
    python -m benchmarks.quality_study decode --max_steps 400 --runs sft,uniform --core 0   # decoding speed of each
    python -m benchmarks.quality_study report               # docs/quality_study.md + plots, summary in docs/results.md
    # One epoch of the 7,273 training rows at batch 4, the model kept and evaluated every 250 steps (learning curves)
    python -m benchmarks.quality_study run --max_steps 1819 --curve_every 250 --runs sft,last_75_rotate2 --core 0
    # Runs that differ only in an anneal train identically until it starts: the later one forks from the other's
    # checkpoint at that step (kept past the rotation with --keep_steps), which saves those steps; the result says so
    python -m benchmarks.quality_study run --max_steps 400 --runs rec_anneal_half --keep_steps 200 --core 0
    python -m benchmarks.quality_study run --max_steps 400 --runs rec_tail_tenth --fork_from rec_anneal_half@200
    # Another model: its own runs, results (docs/study/gemma3/), report and block of docs/results.md
    python -m benchmarks.quality_study run --tag gemma3 --model "$(python tools/get_gemma3.py)" --runs sft --core 0
    python -m benchmarks.quality_study report --tag gemma3

Every run trains `recipes/smollm2_135m_gsm8k_soft.yaml` (batch 4, max_length 256, lr 1e-4 cosine, seed 0 and the same
data order for all) through `soft_peft.cli.train` (the code path of `examples/gsm8k.py`) in a child process pinned
to one core (`OMP_NUM_THREADS=1 taskset -c CORE`), plus the run's own flags; any SoFTConfig flag passes through
(`--variant NAME="--exit_loss_weights last:0.5"`). Data: GSM8K train (`openai/gsm8k`, or `--data FILE`) split once with
`held_out_split(rows, test_size=200, seed=0)` (the split of docs/results.md), written to `<cache>/data/`.

Per run, `<cache>/<run>-<steps>/` holds the checkpoints: an interrupted run resumes from its latest complete one; a
run whose `<results>/<run>-<steps>.json` exists is skipped. Each result holds, per exit, held-out CE, token accuracy
and top-1 agreement with the last layer (`soft_peft.evaluation.per_exit.evaluate_exits`), and the run's median training
seconds/step (timed per step, not counting start-up) and peak RSS (the training process's `ru_maxrss`). `decode` runs
`python -m benchmarks.decode_cost speed` on finished runs' checkpoints, every run with the same exits and prompts
(the first 8 of the same held-out split), and keeps its rows in `<results>/<run>-<steps>.decode.json`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from argparse import RawDescriptionHelpFormatter as RawDescription
from pathlib import Path

from benchmarks.common import (
    GSM8K,
    REPO,
    SPLIT_SEED,
    add_data_argument,
    gsm8k_split,
    parse_variant,
    portable,
    smollm2_path,
)

RECIPE = REPO / "recipes" / "smollm2_135m_gsm8k_soft.yaml"
# The Hub dataset by default; `--data FILE` for a local copy of its train split (JSONL with question/answer)
DATA = GSM8K
CACHE = Path.home() / ".cache" / "soft_peft" / "study"
RESULTS = REPO / "docs" / "study"
# The children run this module again (`_train`, `_eval`) and the decoding benchmark, from the repository root
THIS = [sys.executable, "-m", "benchmarks.quality_study"]
# Flags per run; {last} = the model's depth, {stop} = depth + 1 (a slice over every layer), {half} = max_steps // 2
RUNS = {
    "sft": "--exit_layers {last}",
    "uniform": "",  # the base recipe as is: the paper's uniform loss (soft-peft's default is last:0.75)
    "ramp_all": "--exit_ramp_steps {half} --exit_ramp_order all",
    "ramp_deepest": "--exit_ramp_steps {half} --exit_ramp_order deepest_first",
    "rotate2": "--exit_rotation 2",
    "last_half": "--exit_loss_weights last:0.5",
    # head_last changed almost nothing at 100 steps (the cost is in the shared layers): more weight on the last exit
    "last_75": "--exit_loss_weights last:0.75",
    "last_90": "--exit_loss_weights last:0.9",
    "last_half_ramp": "--exit_loss_weights last:0.5 --exit_ramp_steps {half} --exit_ramp_order all",
    "head_last": "--exit_head_grad last",
    "last_half_head_last": "--exit_loss_weights last:0.5 --exit_head_grad last",
    "distill": "--exit_distill_weight 1.0",
    "distill_half": "--exit_distill_weight 0.5",
    # At 100 steps: last_75's full-model quality (1.084x SFT) at rotate2's step time (1.44x SFT)
    "last_75_rotate2": "--exit_loss_weights last:0.75 --exit_rotation 2",
    # Issue 23's candidates, each the recommended recipe (last_75_rotate2) plus one flag, or LayerSkip's recipe
    "rec_distill_quarter": "--exit_loss_weights last:0.75 --exit_rotation 2 --exit_distill_weight 0.25",
    "rec_late_half": "--exit_loss_weights last:0.75 --exit_rotation 2 --exit_start_steps {half}",
    "rec_layerdrop": "--exit_loss_weights last:0.75 --exit_rotation 2 --layer_dropout 0.1",
    "layerdrop": "--exit_layers {last} --layer_dropout 0.1",  # layer dropout alone: SFT's loss, no early exit
    # recipes/smollm2_135m_gsm8k_layerskip.yaml: every layer an exit, 1 in rotation, 1:1 with the last, dropout 0.1
    "layerskip": "--exit_layers 1:{stop} --exit_loss_weights last:0.5 --exit_rotation 1 --layer_dropout 0.1",
    # Issue 34's candidates for parity at one epoch, each the recommended recipe plus one flag: more weight on the
    # last exit all along, or the early exits' share annealed away over the final half / final tenth of the run
    "rec_last_85": "--exit_loss_weights last:0.85 --exit_rotation 2",
    "rec_anneal_half": "--exit_loss_weights last:0.75 --exit_rotation 2 --exit_anneal_fraction 0.5",
    "rec_tail_tenth": "--exit_loss_weights last:0.75 --exit_rotation 2 --exit_anneal_fraction 0.1",
}


def _model_depth(model: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config["n_layer"])


def _run_flags(template: str, depth: int, max_steps: int) -> list[str]:
    return shlex.split(template.format(last=depth, stop=depth + 1, half=max(1, max_steps // 2)))


def _prepare_split(args) -> tuple[Path, Path]:
    """The fixed train / held-out split of `--data`, written once as JSONL (raw GSM8K rows)."""
    folder = Path(args.cache_dir) / "data"
    train, held_out, meta = folder / "train.jsonl", folder / "held_out.jsonl", folder / "split.json"
    local = Path(args.data).expanduser()
    source = str(local.resolve()) if local.exists() else args.data  # a local copy, or the Hub id
    expected = {"source": source, "held_out": args.held_out, "seed": SPLIT_SEED}
    if meta.exists() and json.loads(meta.read_text()) == expected:
        return train, held_out
    train_rows, held_rows = gsm8k_split(args.data, args.held_out, raw=True)
    folder.mkdir(parents=True, exist_ok=True)
    train_rows.to_json(str(train), lines=True)
    held_rows.to_json(str(held_out), lines=True)
    meta.write_text(json.dumps(expected))
    return train, held_out


def _complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder` with their weights, optimizer and trainer state all written."""
    needed = ("trainer_state.json", "optimizer.pt", "model.safetensors")
    return [c for c in folder.glob("checkpoint-*[0-9]") if all((c / name).exists() for name in needed)]


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    return max(_complete_checkpoints(run_dir), key=lambda c: int(c.name.split("-")[1]), default=None)


def _child(command: list[str], core: int | None, log: Path) -> tuple[int, float]:
    """Run a child on one thread (pinned to `core`); its exit code and peak RSS in GB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    prefix = ["taskset", "-c", str(core)] if core is not None and core >= 0 else []
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(prefix + command)}\n")
        out.flush()
        process = subprocess.Popen(prefix + command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage (taskset execs python, so the pid is the trainer's)
        _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024**2


def _train_argv(args, flags: list[str], train_file: Path, run_dir: Path, depth: int) -> list[str]:
    # Every SoFT run names its exits (the model's default 8), unless its own flags choose them
    from_model = [] if "--exit_layers" in flags else ["--exit_layers", ",".join(map(str, _default_exits(depth)))]
    return [
        *("--config", str(RECIPE), "--model_name_or_path", str(args.model), "--dataset_name", str(train_file)),
        *("--output_dir", str(run_dir), "--max_steps", str(args.max_steps), "--save_steps", str(args.save_steps)),
        *("--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length)),
        *from_model,
        *flags,  # the run's flags come last: they win
    ]


def _default_exits(depth: int) -> list[int]:
    from soft_peft.exits import default_exit_layers

    return default_exit_layers(depth)


def _lock_run(run_dir: Path):
    """An exclusive lock on a run's folder (an open file: the lock lasts while it is referenced), or ``None`` when
    another process holds it. The kernel releases it when this process dies, so a crash leaves no stale lock."""
    lock = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def run_name(args, run: str) -> str:
    """`<run>-<steps>`, or `<tag>-<run>-<steps>` in a study of another model (`--tag`): the folder in the cache."""
    return f"{args.tag}-{run}-{args.max_steps}" if args.tag else f"{run}-{args.max_steps}"


def run_one(args, run: str, template: str) -> str:
    """Train (or resume) and evaluate one run; returns "done", "skipped", "busy" or "failed"."""
    depth = _model_depth(args.model)
    flags = _run_flags(template, depth, args.max_steps)
    name = run_name(args, run)
    result_path, run_dir = Path(args.results_dir) / f"{name}.json", Path(args.cache_dir) / name
    if result_path.exists():
        recorded = json.loads(result_path.read_text())["flags"]
        if recorded != flags:
            raise SystemExit(f"{result_path} was made with flags {recorded}, not {flags}: rename the variant.")
        print(f"[study] {name}: finished, skipped")
        return "skipped"
    train_file, held_out = _prepare_split(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run(run_dir)  # held until this function returns
    if lock is None:
        print(f"[study] {name}: running in another process, skipped")
        return "busy"
    log, segments = run_dir / "study.log", run_dir / "segments.jsonl"
    argv = _train_argv(args, flags, train_file, run_dir, depth)
    if args.fork_from and not (run_dir / "trainer_state.json").exists():
        if _latest_checkpoint(run_dir) is None:
            _fork(args, run, flags, run_dir, depth)
        elif not (run_dir / "fork.json").exists():
            print(f"[study] {name}: has checkpoints of its own; resuming them, --fork_from not used")
    fork = json.loads((run_dir / "fork.json").read_text()) if (run_dir / "fork.json").exists() else None
    if not (run_dir / "trainer_state.json").exists():  # written beside the final model only
        checkpoint = _latest_checkpoint(run_dir)
        resume = ["--resume_from_checkpoint", str(checkpoint)] if checkpoint else []
        if fork and checkpoint and checkpoint.name == f"checkpoint-{fork['step']}":
            resume.append("--allow_resume_changes")  # the source run's anneal settings, checked equal by `_fork`
        print(f"[study] {name}: training" + (f", resuming from {checkpoint.name}" if checkpoint else ""), flush=True)
        started = time.time()
        os.environ["SOFT_PEFT_STUDY_CURVE_EVERY"] = str(args.curve_every)  # read by the child's on_save
        os.environ["SOFT_PEFT_STUDY_KEEP_STEPS"] = ",".join(map(str, args.keep_steps))
        code, rss = _child([*THIS, "_train", str(run_dir), *argv, *resume], args.core, log)
        with open(segments, "a") as out:
            segment = {"resumed_from": checkpoint.name if checkpoint else None, "exit_code": code}
            out.write(json.dumps({**segment, "wall_seconds": time.time() - started, "peak_rss_gb": rss}) + "\n")
        if code != 0:
            print(f"[study] {name}: training failed (exit {code}); see {log}", file=sys.stderr)
            return "failed"
    exits = ",".join(map(str, _default_exits(depth)))
    evaluation = run_dir / "eval.json"
    eval_argv = [str(run_dir), str(held_out), str(args.eval_rows), str(args.max_length), exits, str(evaluation)]
    # An interrupted evaluation leaves no eval.json (written whole at its end); a finished one is not run again
    code = 0 if evaluation.exists() else _child([*THIS, "_eval", *eval_argv], args.core, log)[0]
    if code != 0:
        print(f"[study] {name}: evaluation failed (exit {code}); see {log}", file=sys.stderr)
        return "failed"
    try:
        curve = _curve(args, run_dir, held_out, exits, log)
    except RuntimeError as error:
        print(f"[study] {name}: {error}", file=sys.stderr)
        return "failed"
    # Steps past the checkpoint a run resumed from were timed twice: keep the run that went on to the end
    records = [json.loads(line) for line in (run_dir / "step_times.jsonl").read_text().splitlines()]
    steps = list({record["step"]: record for record in records}.values())
    # The first step of each process pays one-off costs (allocations, lazy inits): left out of the median
    timed = [s["seconds"] for s in steps if not s["first_in_process"]] or [s["seconds"] for s in steps]
    state = json.loads((run_dir / "trainer_state.json").read_text())
    train_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    result = {
        "run": run,
        "model": portable(str(args.model)),
        **({"tag": args.tag} if args.tag else {}),
        "flags": flags,
        "max_steps": args.max_steps,
        "command": shlex.join(["python", "examples/gsm8k.py", *map(portable, argv)]),  # no path of this machine
        "seconds_per_step": statistics.median(timed),
        "peak_rss_gb": max(json.loads(line)["peak_rss_gb"] for line in segments.read_text().splitlines()),
        "final_train_loss": train_losses[-1] if train_losses else None,
        **json.loads(evaluation.read_text()),
    }
    if curve is not None:  # the final model closes the curve
        result["curve"] = {**curve, str(args.max_steps): result["exits"]}
    if fork:
        result["forked_from"] = fork
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[study] {name}: done, {result_path}")
    return "done"


ANNEAL_FLAGS = ("--exit_anneal_fraction", "--exit_anneal_floor")


def _without_anneal(flags: list[str]) -> tuple[list[str], dict[str, float]]:
    """A run's flags without its anneal flags, and the anneal flags' values."""
    rest, anneal, items = [], {}, iter(flags)
    for flag in items:
        name, equals, value = flag.partition("=")
        if name in ANNEAL_FLAGS:
            anneal[name] = float(value if equals else next(items))
        else:
            rest.append(flag)
    return rest, anneal


def fork_refusal(source_flags: list[str], flags: list[str], step: int, max_steps: int) -> str | None:
    """Why a run with `flags` cannot start from the checkpoint at `step` of a run with `source_flags` (both of
    `max_steps`), or None when it can: the two must train identically up to `step`, so their flags may differ only in
    the anneal, and neither run's anneal may have started before `step` (`ExitSchedule.anneal_factor` is then exactly
    1, and the loss is bit for bit the same)."""
    from soft_peft.schedule import ExitSchedule

    (source_rest, source_anneal), (rest, anneal) = _without_anneal(source_flags), _without_anneal(flags)
    if source_rest != rest:
        return f"its flags {rest} differ from the source's {source_rest} in more than the anneal"
    for values in (source_anneal, anneal):
        fraction = values.get("--exit_anneal_fraction", 0.0)
        schedule = ExitSchedule(anneal_fraction=fraction, anneal_floor=values.get("--exit_anneal_floor", 0.0))
        if schedule.anneal_factor(step - 1, max_steps) != 1.0:
            start = int(max_steps * (1 - fraction))
            return f"an anneal over the final {fraction} of {max_steps} steps starts at step {start}, before {step}"
    return None


def _fork(args, run: str, flags: list[str], run_dir: Path, depth: int) -> None:
    """Start `run` from the source run's checkpoint at the fork step (`--fork_from SOURCE@STEP`): the two trained
    identically up to there (`fork_refusal`), so the fork saves those steps. Its checkpoint, the source's curve
    snapshots up to the step (with their evaluations) and its step times are hard-linked or copied; `fork.json`
    records the source, and the result names it."""
    source, step = args.fork_from
    source_dir = Path(args.cache_dir) / run_name(args, source)
    source_flags = _run_flags(args.runs_table[source], depth, args.max_steps)
    refusal = fork_refusal(source_flags, flags, step, args.max_steps)
    if refusal:
        raise SystemExit(f"cannot fork {run} from {source} at step {step}: {refusal}.")
    candidates = [source_dir / "kept" / f"checkpoint-{step}", source_dir / f"checkpoint-{step}"]
    checkpoint = next((c for c in candidates if c in _complete_checkpoints(c.parent)), None)
    if checkpoint is None:
        raise SystemExit(
            f"cannot fork {run}: no complete checkpoint-{step} in {source_dir} or its kept/ folder; run the source "
            f"with --keep_steps {step} (its checkpoints rotate away) and fork once it is past step {step}."
        )
    from benchmarks.quality_children import link_folder

    link_folder(checkpoint, run_dir / checkpoint.name)
    for snapshot in (source_dir / "curve").glob("step-*[0-9]"):
        if int(snapshot.name.split("-")[1]) <= step:
            link_folder(snapshot, run_dir / "curve" / snapshot.name)
    times = (source_dir / "step_times.jsonl").read_text().splitlines()
    (run_dir / "step_times.jsonl").write_text("".join(t + "\n" for t in times if json.loads(t)["step"] <= step))
    (run_dir / "segments.jsonl").write_text((source_dir / "segments.jsonl").read_text())
    (run_dir / "fork.json").write_text(json.dumps({"run": source, "step": step}))
    print(f"[study] {run_name(args, run)}: forked from {source_dir.name} at step {step}")


def _decode_flags(depth: int) -> list[str]:
    """The study's decoding settings: every run's checkpoint decodes with the same exits (the SoFT runs' early ones),
    whatever it recorded, so SFT's checkpoint is measured with the exits SoFT trained."""
    early = _default_exits(depth)[:-1]
    # Only what the study compares (SoFT's own decoders, each run's recommended settings): at 16 prompts and every
    # mode the decoding benchmark took 6 min for its first prompt on a core shared with tests: ~1.5 h per checkpoint
    return [
        *("--draft_exits", ",".join(map(str, early[::2][:3])), "--dynamic_exits", ",".join(map(str, early))),
        *("--num_prompts", "8", "--max_new_tokens", "128", "--batch_sizes", "1", "--threads", "1"),
        *("--modes", "self-speculative,dynamic", "--thresholds", "0.9,0.5", "--kv_fills", "recompute"),
        *("--draft_stop_thresholds", "0.5"),  # the recommended setting; without a stop costs a second run per exit
    ]


def decode_one(args, run: str) -> str:
    """`python -m benchmarks.decode_cost speed` on one finished run's checkpoint; returns "done", "skipped", "missing",
    "busy" or "failed". Writes `<results>/<run>-<steps>.decode.json` (rows) and `.decode.md` (the table)."""
    name = run_name(args, run)
    results, run_dir = Path(args.results_dir), Path(args.cache_dir) / name
    decoded = results / f"{name}.decode.json"
    if decoded.exists():
        print(f"[study] {name}: decoded, skipped")
        return "skipped"
    if not (results / f"{name}.json").exists() or not (run_dir / "config.json").exists():
        print(f"[study] {name}: not trained yet (run `benchmarks.quality_study run --runs {run}` first), skipped")
        return "missing"
    lock = _lock_run(run_dir)  # held until this function returns
    if lock is None:
        print(f"[study] {name}: busy in another process, skipped")
        return "busy"
    flags = _decode_flags(_model_depth(str(run_dir))) + shlex.split(args.decode_flags)  # the user's flags win
    outputs = ["--output", str(results / f"{name}.decode.md"), "--json", str(decoded)]
    command = [sys.executable, "-m", "benchmarks.decode_cost", "speed", "--model_name_or_path", str(run_dir)]
    print(f"[study] {name}: decoding", flush=True)
    code, _ = _child([*command, "--data", str(args.data), *flags, *outputs], args.core, run_dir / "study.log")
    if code != 0:
        print(f"[study] {name}: decoding failed (exit {code}); see {run_dir / 'study.log'}", file=sys.stderr)
        return "failed"
    make_decode_portable(decoded, args.data)
    print(f"[study] {name}: decoded, {decoded}")
    return "done"


def make_decode_portable(decoded: Path, data: str, repo: Path = REPO) -> None:
    """Rewrite a decode's `.decode.json` and `.decode.md` so that they name no path of this machine: the repository
    and home folders become relative and `~`, and a local copy of GSM8K (`--data FILE`) is named by its Hub id, which
    gives the same prompts. These files are committed, and read by people on other machines. `repo`: the checkout
    the decode ran from."""
    local = Path(data).expanduser()
    copies = [str(local.resolve()), str(data)] if local.exists() else []  # as given and resolved, before home is ~
    for path in (decoded, decoded.with_suffix(".md")):
        text = path.read_text()
        for copy in copies:
            text = text.replace(copy, GSM8K)
        path.write_text(portable(text, repo))


def _curve(args, run_dir: Path, held_out: Path, exits: str, log: Path) -> dict[str, dict] | None:
    """Per-exit metrics of every kept snapshot (`--curve_every`), evaluated once each; None when none was kept."""
    snapshots = sorted((run_dir / "curve").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    curve = {}
    for snapshot in snapshots:
        if int(snapshot.name.split("-")[1]) == args.max_steps:
            continue  # the final model itself, evaluated already: it closes the curve
        evaluation = snapshot / "eval.json"
        if not evaluation.exists():
            argv = [str(snapshot), str(held_out), str(args.eval_rows), str(args.max_length), exits, str(evaluation)]
            code, _ = _child([*THIS, "_eval", *argv], args.core, log)
            if code != 0:
                raise RuntimeError(f"evaluation of {snapshot} failed (exit {code}); see {log}")
        curve[snapshot.name.split("-")[1]] = json.loads(evaluation.read_text())["exits"]
    return curve or None


def build_parser() -> argparse.ArgumentParser:
    """The study's command line: `run`, `decode`, `report` or `list`, and their flags."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_study", description=__doc__, formatter_class=RawDescription
    )
    parser.add_argument("command", choices=["run", "decode", "report", "list"])
    parser.add_argument("--runs", default="all", help="Comma-separated run names, or 'all' (see `list`).")
    parser.add_argument(
        "--variant", type=parse_variant, action="append", default=[], help='Add a run: NAME="--flag value ...".'
    )
    parser.add_argument("--max_steps", type=int, default=100, help="Steps per run: 100 to screen, >= 400 final.")
    parser.add_argument("--core", type=int, default=0, help="CPU core of the child processes (-1: not pinned).")
    parser.add_argument("--model", default=None, help="Model folder (default: python tools/get_smollm2.py).")
    add_data_argument(parser)
    parser.add_argument("--held_out", type=int, default=200, help="Rows held out (fixed split, seed 0).")
    parser.add_argument("--eval_rows", type=int, default=200, help="Held-out rows evaluated per run.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--save_steps", type=int, default=25, help="Checkpoint interval (resume granularity).")
    parser.add_argument(
        "--curve_every",
        type=int,
        default=0,
        help="Keep the model every N steps (a multiple of --save_steps) and evaluate each: the report draws the "
        "ratios to SFT as curves over steps. 0 = only the final model.",
    )
    parser.add_argument(
        "--keep_steps",
        type=_steps,
        default=[],
        help="Keep the whole checkpoints at these steps (comma-separated) past the rotation, in <run>/kept/, for "
        "other runs to fork from.",
    )
    parser.add_argument(
        "--fork_from",
        type=_fork_point,
        default=None,
        metavar="RUN@STEP",
        help="Start the one selected run from RUN's checkpoint at STEP (kept with --keep_steps) instead of step 0. "
        "Refused unless the two runs train identically up to STEP: flags equal but for the anneal, which must not "
        "have started. The result records the fork.",
    )
    parser.add_argument(
        "--tag",
        type=_tag,
        default="",
        help="A study of another model (`--model`), e.g. gemma3: its runs are `<tag>-<run>-<steps>`, its results go "
        "to docs/study/<tag>/, its report to docs/quality_study_<tag>.md and its own block of docs/results.md.",
    )
    parser.add_argument("--cache_dir", default=str(CACHE), help="Checkpoints and the data split.")
    parser.add_argument(
        "--results_dir", default=None, help="Per-run result JSON files (committed; default docs/study[/<tag>])."
    )
    parser.add_argument("--output", default=None, help="Report (`report`; default docs/quality_study[_<tag>].md).")
    parser.add_argument(
        "--results_md", default=str(REPO / "docs" / "results.md"), help="Summary block goes here (`report`)."
    )
    parser.add_argument(
        "--decode_flags", default="", help='`decode`: extra `decode_cost speed` flags, e.g. "--num_prompts 32".'
    )
    parser.add_argument("--dry-run", action="store_true", help="Print each run's training command; run nothing.")
    return parser


def _steps(text: str) -> list[int]:
    try:
        steps = [int(step) for step in text.split(",") if step.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated steps, e.g. 200,360; got {text!r}") from None
    if any(step <= 0 for step in steps):
        raise argparse.ArgumentTypeError(f"steps must be positive, got {text!r}")
    return steps


def _tag(text: str) -> str:
    if text and not re.fullmatch(r"[a-z0-9][a-z0-9_]*", text):  # "" (the default): SmolLM2's study
        raise argparse.ArgumentTypeError(f"a tag is lower-case letters, digits and _, e.g. gemma3; got {text!r}")
    return text


def _fork_point(text: str) -> tuple[str, int]:
    run, at, step = text.rpartition("@")
    if not (run and at and step.isdigit() and int(step) > 0):
        raise argparse.ArgumentTypeError(f"expected RUN@STEP, e.g. rec_anneal_half@200; got {text!r}")
    return run, int(step)


def _dry_run(args, runs: dict[str, str], selected: list[str]) -> None:
    """Print each selected run's training command, as `run` would start it."""
    depth = _model_depth(args.model)
    for run in selected:
        run_dir = Path(args.cache_dir) / run_name(args, run)
        flags = _run_flags(runs[run], depth, args.max_steps)
        train_file = Path(args.cache_dir) / "data" / "train.jsonl"
        command = _train_argv(args, flags, train_file, run_dir, depth)
        print(f"{run}: python examples/gsm8k.py {shlex.join(command)}")


def main(argv: list[str] | None = None) -> int:
    """Run the study's command (see `build_parser`); the children's `_train` and `_eval` also come here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_train", "_eval"):
        from benchmarks.quality_children import eval_child, train_child

        return train_child(argv[1], argv[2:]) if argv[0] == "_train" else eval_child(*argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.curve_every < 0 or (args.curve_every and args.curve_every % args.save_steps):
        parser.error(f"--curve_every {args.curve_every} must be 0 or a multiple of --save_steps {args.save_steps}.")
    if args.results_dir is None:
        args.results_dir = str(RESULTS / args.tag if args.tag else RESULTS)
    if args.output is None:
        args.output = str(REPO / "docs" / (f"quality_study_{args.tag}.md" if args.tag else "quality_study.md"))
    runs = {**RUNS, **dict(args.variant)}
    if args.command == "list":
        for name, flags in runs.items():
            print(f"{name:16s} {flags}")
        return 0
    if args.command == "report":
        from benchmarks.quality_report import write_report

        write_report(Path(args.results_dir), Path(args.output), REPO, results_md=Path(args.results_md), tag=args.tag)
        return 0
    selected = list(runs) if args.runs == "all" else [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in selected if r not in runs]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {sorted(runs)} (add one with --variant).")
    if args.fork_from:
        source, step = args.fork_from
        if args.command != "run" or len(selected) != 1:
            parser.error("--fork_from starts one run: use it with `run` and a single name in --runs.")
        if source not in runs or source in selected:
            parser.error(f"--fork_from {source}@{step}: the source must be another known run ({sorted(runs)}).")
        if step >= args.max_steps:
            parser.error(f"--fork_from {source}@{step}: the step must be below --max_steps {args.max_steps}.")
    args.runs_table = runs
    if args.model is None:
        args.model = smollm2_path()
    if args.dry_run:
        _dry_run(args, runs, selected)
        return 0
    if args.command == "decode":
        outcomes = {run: decode_one(args, run) for run in selected}
    else:
        outcomes = {run: run_one(args, run, runs[run]) for run in selected}
    print("[study] " + ", ".join(f"{run}: {outcome}" for run, outcome in outcomes.items()))
    return 1 if "failed" in outcomes.values() else 0


if __name__ == "__main__":
    sys.exit(main())
