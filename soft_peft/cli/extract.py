"""`soft-peft extract`: save a SoFT checkpoint's exit as a standalone model, ready to serve as a draft model.

    soft-peft extract --model_name_or_path RUN --num_layers 15 --output_dir RUN-15L
    soft-peft extract --model_name_or_path RUN --num_layers 9,15,21 --output_dir RUN-exits   # one folder per exit
    soft-peft extract --model_name_or_path RUN --num_layers 15 --output_dir RUN-15L --push_to_hub --hub_model_id me/x

Each folder is a plain transformers model (reloaded by `AutoModelForCausalLM.from_pretrained`, its logits those of
exit N of the source), with the source's tokenizer and a model card (README.md). A LoRA adapter folder is merged
into its base model first. The command prints the transformers, vLLM and SGLang invocations that serve the exit as
the source's draft model. The output folder must be new or empty (`--overwrite_output_dir` replaces one that holds
a saved model), is never the model being read, and takes one export at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from ..hub import looks_like_hub_id, resolve_model_path
from .arg_types import OneLineErrorParser, add_config_option, parse_ints, positive_int, recipe_argv
from .export_folder import (
    adapter_base_of,
    check_export_folder,
    check_export_target,
    export_lock,
    recover_interrupted_export,
    staged_folder,
)
from .folder_writes import write_failure
from .output_dir_lock import OutputDirInUse
from .preflight import error_reason, read_model_facts, untrained_exit_warning, warn

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="soft-peft extract", description=__doc__.split("\n")[0])
    # A training recipe's output_dir and Hub repository are the trained model's, not the sub-models'
    add_config_option(
        parser,
        ignored={
            "output_dir": "training's folder; pass --output_dir for the sub-models",
            "push_to_hub": "training's upload",
            "hub_model_id": "training's repository",
        },
    )
    parser.add_argument("--model_name_or_path", required=True, help="A model or LoRA adapter folder, or Hub name.")
    parser.add_argument(
        "--num_layers",
        type=parse_ints,
        required=True,
        help="Depth of the sub-model (an exit it trained), or several ('9,15,21'): one folder per exit.",
    )
    parser.add_argument("--output_dir", required=True, help="Folder to write the sub-model(s) to; new or empty.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace a non-empty --output_dir that holds a saved model (an earlier export).",
    )
    parser.add_argument(
        "--num_speculative_tokens", type=positive_int, default=5, help="Drafts per step in the printed vLLM/SGLang."
    )
    parser.add_argument("--license", default=None, help="Licence for the model card (default: the source's card's).")
    parser.add_argument(
        "--eval_results", default=None, help="A `soft-peft eval` metrics.json (or its folder) for the model card."
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Upload each sub-model to its own Hub repository.")
    parser.add_argument(
        "--hub_model_id",
        default=None,
        help="Repository id (default: --output_dir's name); with several exits, '<id>-<N>-layers' each.",
    )
    parser.add_argument("--hub_private_repo", action="store_true", default=None, help="Create private repositories.")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: `hf auth login`'s).")
    return parser


def _load_tokenizer(parser: argparse.ArgumentParser, sources: list[str]):
    """The first tokenizer found in ``sources`` (a draft model must share its target's tokenizer)."""
    from transformers import AutoTokenizer

    reasons = []
    for source in sources:
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as error:
            reasons.append(f"{source}: {error_reason(error)}")
    parser.error(
        f"no tokenizer could be loaded ({'; '.join(reasons)}); a sub-model is exported with its source's tokenizer. "
        "Save the tokenizer into the model folder (`tokenizer.save_pretrained(FOLDER)`) and run again."
    )


def _repo_ids(args: argparse.Namespace, layers: list[int]) -> dict[int, str]:
    base = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    return {k: base if len(layers) == 1 else f"{base}-{k}-layers" for k in layers}


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, facts, sources: list[str]) -> list[int]:
    """Every flag the config and the file system can judge, before the model loads; returns the exits to extract."""
    layers = args.num_layers
    if not layers:
        parser.error("--num_layers is empty: give a depth such as 15, or several such as 9,15.")
    if len(set(layers)) != len(layers):
        parser.error(f"--num_layers {','.join(map(str, layers))}: each depth once.")
    bad = [k for k in layers if not 1 <= k <= facts.num_layers]
    if bad:
        parser.error(
            f"--num_layers {','.join(map(str, bad))}: must be in 1..{facts.num_layers} ({facts.name} has "
            f"{facts.num_layers} layers)."
        )
    reason = check_export_folder(args.output_dir, args.overwrite_output_dir)
    if reason:
        parser.error(reason)
    if args.push_to_hub:
        bad_ids = [repo for repo in _repo_ids(args, layers).values() if not looks_like_hub_id(repo)]
        if bad_ids:
            parser.error(f"--hub_model_id: {bad_ids[0]!r} is not a Hub repository id ('name' or 'namespace/name').")
    elif args.hub_model_id or args.hub_private_repo or args.hub_token:
        parser.error("--hub_model_id, --hub_private_repo and --hub_token need --push_to_hub.")
    warn(parser.prog, untrained_exit_warning(facts, layers, "--num_layers"))
    return sorted(layers)


def _load_merged(model_path: str, adapter_base: str | None):
    """The source as a plain transformers model in its own dtype; a LoRA adapter merged into its base model.

    Raises:
        NonFiniteWeightsError: for a NaN or infinite weight (merged in: the adapter's or its base model's).
    """
    from transformers import AutoModelForCausalLM

    from ..checkpoints import read_adapter_exit_layers
    from ..exits import record_exit_layers
    from ..run_guards import check_finite_weights

    if adapter_base is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", trust_remote_code=False).eval()
        check_finite_weights(model, model_path)
        return model
    from peft import AutoPeftModelForCausalLM

    print(f"Merging the adapter {model_path} into its base model {adapter_base}", file=sys.stderr)
    model = (
        AutoPeftModelForCausalLM.from_pretrained(model_path, dtype="auto", trust_remote_code=False)
        .merge_and_unload()
        .eval()
    )
    check_finite_weights(model, model_path)
    exits = read_adapter_exit_layers(model_path)
    if exits is not None:  # the adapter's exits, not those of a SoFT base model it was trained on
        record_exit_layers(model, exits)
    return model


def _load_or_refuse(parser: argparse.ArgumentParser, model_path: str, adapter_base: str | None):
    """[`_load_merged`], with a model holding NaN or infinite weights refused in one line (exit 2)."""
    from ..run_guards import NonFiniteWeightsError

    try:
        return _load_merged(model_path, adapter_base)
    except NonFiniteWeightsError as error:
        parser.error(str(error))


def _quiet_deepspeed_accelerator_probe() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" warning from this process.

    `save_pretrained` unwraps the model through accelerate, which imports DeepSpeed whenever it is installed, and
    DeepSpeed then warns that it found no GPU: noise for an export, which never runs DeepSpeed. A filter on its
    logger (made before DeepSpeed configures it, and kept when it does) drops that one record and nothing else.
    """
    logger = logging.getLogger("DeepSpeed")
    if _not_the_cpu_fallback_warning not in logger.filters:  # once per process, however many exports it runs
        logger.addFilter(_not_the_cpu_fallback_warning)


def _not_the_cpu_fallback_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def main(argv: list[str]) -> int:
    """Run `soft-peft extract`; returns the exit status (2, with one line on stderr, for unusable flags, a folder in
    use by another export, or a save that failed for lack of space or permission)."""
    parser = _parser()
    args = parser.parse_args(recipe_argv(parser, list(argv)))
    try:
        model_path = resolve_model_path(args.model_name_or_path)
        facts = read_model_facts(model_path)
    except ValueError as error:  # ModelNotFoundError included
        parser.error(str(error))
    base = adapter_base_of(model_path)
    sources = [model_path] + ([base] if base else [])
    reason = check_export_target(args.output_dir, sources)
    if reason:
        parser.error(reason)
    try:  # held to the end: a second export into this folder would otherwise replace this one as it finishes
        lock = export_lock(args.output_dir).acquire()
    except OutputDirInUse as error:
        parser.error(str(error))
    with lock:
        for line in recover_interrupted_export(args.output_dir):
            print(f"{parser.prog}: {line}", file=sys.stderr)
        layers = _check(parser, args, facts, sources)
        return _export(parser, args, model_path, base, sources, layers)


@contextlib.contextmanager
def _refusing_write_failures(parser: argparse.ArgumentParser, output_dir: str) -> Iterator[None]:
    """A save that failed for lack of space or permission as one line (``staged_folder`` already undid it)."""
    try:
        yield
    except Exception as error:
        failure = write_failure(error)
        if failure is None:
            raise
        reason, full = failure
        fix = "Free space on its disk" if full else "Fix its permissions"
        parser.error(
            f"--output_dir {output_dir}: the export could not be written ({reason}); nothing was changed there. "
            f"{fix} or choose another --output_dir."
        )


def _export(parser, args, model_path: str, adapter_base: str | None, sources: list[str], layers: list[int]) -> int:
    """Load, extract, save (staged) and push; the checks have passed and the folder's lock is held."""
    from ..model_card import card_metadata, load_eval_metrics

    eval_metrics = None
    if args.eval_results is not None:
        try:
            eval_metrics = load_eval_metrics(args.eval_results)
        except ValueError as error:
            parser.error(f"--eval_results {error}")
    tokenizer = _load_tokenizer(parser, sources)

    from ..checkpoints import read_run_record
    from ..exits import recorded_exit_layers
    from ..hub import push_folders_to_hub
    from ..inference.submodel import extract_submodel
    from ..model_card import model_label, write_model_card
    from ..model_layout import num_decoder_layers
    from ..serving import draft_model_invocations

    model = _load_or_refuse(parser, model_path, adapter_base)
    exits_trained = recorded_exit_layers(model)
    source_cards = [card_metadata(s) for s in sources if os.path.isdir(s)]
    license = args.license or next((c["license"] for c in source_cards if c.get("license")), None)
    # The base model: an adapter's own, a Hub id in the source's card, else the run record SoFTTrainer saved with the
    # model (a local base, which cards leave out of their metadata)
    record = read_run_record(model_path) if os.path.isdir(model_path) else None
    base_model = (
        adapter_base
        or next((c["base_model"] for c in source_cards if c.get("base_model")), None)
        or (record or {}).get("base_model")
        or None
    )
    total = model.num_parameters()
    repo_ids = _repo_ids(args, layers)
    family = len(layers) > 1
    folders = {k: os.path.join(args.output_dir, f"{k}-layers") if family else args.output_dir for k in layers}
    _quiet_deepspeed_accelerator_probe()
    with _refusing_write_failures(parser, args.output_dir), staged_folder(args.output_dir) as staging:
        for k in layers:
            folder = os.path.join(staging, f"{k}-layers") if family else staging
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # its untrained-exit warning was already given
                submodel = extract_submodel(model, k)  # shares the source's weights: nothing copied in memory
            submodel.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            draft = repo_ids[k] if args.push_to_hub else folders[k]
            name = os.path.basename(os.path.normpath(folders[k]))
            title = f"{name}: exit {k} of {model_label(args.model_name_or_path)}"
            write_model_card(
                folder, title,
                license, base_model, num_layers=k, num_parameters=submodel.num_parameters(),
                source=args.model_name_or_path, exits_trained=exits_trained,
                source_layers=num_decoder_layers(model), source_parameters=total, eval_metrics=eval_metrics,
                invocations=draft_model_invocations(args.model_name_or_path, draft, args.num_speculative_tokens),
            )  # fmt: skip
    for k in layers:
        print(f"Saved the {k}-layer sub-model ({extract_submodel(model, k).num_parameters() / total:.0%} of the "
              f"parameters), its tokenizer and model card to {folders[k]}")  # fmt: skip
    if args.push_to_hub:
        urls = push_folders_to_hub(
            {repo_ids[k]: folders[k] for k in layers}, private=args.hub_private_repo, token=args.hub_token
        )
        print("Pushed to " + ", ".join(urls))
    _print_invocations(args, layers, folders, repo_ids, adapter_base)
    return 0


def _print_invocations(args, layers, folders, repo_ids, adapter_base) -> None:
    from ..serving import draft_model_invocations

    k = layers[-1]  # the deepest extracted exit: the best-accepted drafts
    draft = repo_ids[k] if args.push_to_hub else folders[k]
    snippets = draft_model_invocations(args.model_name_or_path, draft, args.num_speculative_tokens)
    print(f"\nServe exit {k} as the draft model of {args.model_name_or_path} (speculative decoding):")
    for engine, text in snippets.items():
        print(f"\n# {engine}\n{text}")
    if adapter_base:
        print(
            f"\n# vLLM and SGLang take a full model as the target: serve {args.model_name_or_path} merged into "
            f"{adapter_base} (peft's `merge_and_unload()` then `save_pretrained`)."
        )
