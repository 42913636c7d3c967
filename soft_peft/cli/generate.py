"""`soft-peft generate`: decode one prompt with a sub-model, self-speculative decoding or dynamic early exit.

    soft-peft generate --model_name_or_path RUN --prompt_format gsm8k --prompt "Janet has 3 apples ..." --draft_exit 15
    soft-peft generate --model_name_or_path RUN --prompt "..." --thresholds 0.9 [--exits 15,21,27]
    soft-peft generate --model_name_or_path RUN --prompt "..." --num_layers 18      # greedy with a sub-model

Add ``--vocab_texts train.jsonl`` to draft and pre-check confidence on the ``--vocab_size`` most frequent tokens of
those texts (every string field of a JSON/JSONL file, or the lines of a text file): the output does not change.
With ``--thresholds``, ``--exit_on_subset`` lets that subset alone decide early exits (faster, approximate).

Prints the generated text, then the decoder's statistics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings

from ..hub import resolve_model_path
from ..prompt_templates import PROMPT_FORMATS, format_prompt
from .arg_types import OneLineErrorParser, add_config_option, parse_ints, positive_int, recipe_argv, refuse_option
from .preflight import ModelFacts, check_model_files, read_model_facts, untrained_exit_warning, warn

__all__ = ["main"]


def _thresholds(text: str) -> list[float]:
    """An argparse ``type``: one number or a comma-separated list (their range is the decoder's to check)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers, e.g. 0.9 or 0.9,0.8"
        ) from None
    return values


def _draft_length(text: str) -> str | int:
    """An argparse ``type``: ``adaptive`` or an integer >= 1."""
    return "adaptive" if text.strip().lower() == "adaptive" else positive_int(text)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="soft-peft generate", description=__doc__.split("\n")[0])
    add_config_option(parser)
    parser.add_argument("--model_name_or_path", required=True, help="A local HF folder or Hub name.")
    parser.add_argument(
        "--tokenizer_name_or_path",
        help="The tokenizer's folder or Hub name, when the model folder has none (default: the model's own).",
    )
    parser.add_argument(
        "--prompt", required=True, help="Prompt text; --prompt_format or --chat wrap it as the model was trained."
    )
    wrap = parser.add_mutually_exclusive_group()
    wrap.add_argument(
        "--prompt_format",
        choices=PROMPT_FORMATS,
        help="Wrap the prompt in the template training used for this --dataset_format: 'alpaca' (the instruction "
        "template; the alpaca recipes), 'gsm8k' or 'triviaqa' ('Question: ...\\nAnswer:').",
    )
    wrap.add_argument("--chat", action="store_true", help="Apply the tokenizer's chat template to the prompt.")
    parser.add_argument("--max_new_tokens", type=positive_int, default=128)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--draft_exit", type=int, help="Self-speculative decoding drafting with this exit.")
    mode.add_argument(
        "--thresholds", type=_thresholds, help="Dynamic early exit: one threshold, or one per exit ('0.9,0.8')."
    )
    mode.add_argument("--num_layers", type=int, help="Greedy decoding with the sub-model of the first N layers.")
    parser.add_argument(
        "--num_draft_tokens", type=_draft_length, default="adaptive", help="Drafts per cycle (int) or 'adaptive'."
    )
    parser.add_argument(
        "--draft_stop_threshold", type=float, default=None, help="Stop drafting at a draft this unconfident (0..1)."
    )
    parser.add_argument(
        "--early_draft_exits",
        type=parse_ints,
        default=[],
        help="Exits below --draft_exit to draft from first ('9,12'; needs a stop).",
    )
    parser.add_argument("--exits", default=None, help="Exits checked by dynamic early exit ('15,21,27').")
    refuse_option(
        parser,
        "--exit_layers",
        "--exit_layers is training's setting (the exits a model is trained at); the exits dynamic early exit checks "
        "are --exits, such as --thresholds 0.9 --exits 15,21,27.",
    )
    parser.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin"])
    parser.add_argument("--kv_fill", default="recompute", choices=["recompute", "propagate"])
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_texts", default=None, help="Texts whose frequent tokens draft and pre-check.")
    parser.add_argument(
        "--vocab_size", type=positive_int, default=4096, help="Frequent tokens kept from --vocab_texts."
    )
    parser.add_argument(
        "--exit_on_subset", action="store_true", help="Dynamic: decide early exits on the subset alone (approximate)."
    )
    return parser


def _read_texts(path: str) -> list[str]:
    """Every string field of a JSON/JSONL file's records, or the lines of any other text file."""
    with open(path, encoding="utf-8") as handle:
        if not path.endswith((".json", ".jsonl")):
            return [line for line in handle.read().splitlines() if line.strip()]
        text = handle.read()
    records = json.loads(text) if path.endswith(".json") else [json.loads(line) for line in text.splitlines() if line]
    records = records if isinstance(records, list) else [records]
    return [value for record in records for value in record.values() if isinstance(value, str)]


def _check_flag_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that only make sense with a decoding mode they lack (the decoders cannot see which flags were given)."""
    if args.draft_exit is None and (
        args.early_draft_exits or args.draft_stop_threshold is not None or args.num_draft_tokens != "adaptive"
    ):
        parser.error("--num_draft_tokens, --draft_stop_threshold and --early_draft_exits need --draft_exit.")
    if args.exits is not None and args.thresholds is None:
        parser.error("--exits chooses the exits of dynamic early exit: it needs --thresholds.")
    if args.vocab_texts is not None:
        if args.draft_exit is None and args.thresholds is None:
            parser.error("--vocab_texts needs --draft_exit or --thresholds (a decoder that drafts/checks).")
        if not os.path.isfile(args.vocab_texts):
            parser.error(f"--vocab_texts {args.vocab_texts}: no such file.")
    if args.exit_on_subset and (args.thresholds is None or args.vocab_texts is None):
        parser.error("--exit_on_subset needs --thresholds and --vocab_texts (the subset to decide on).")


def _check_before_loading(parser: argparse.ArgumentParser, args: argparse.Namespace, facts: ModelFacts) -> None:
    """Every flag that the model's config can judge, by the decoders' own checks, as an argparse error (exit code 2);
    warnings for untrained exits. With ``--thresholds``, ``args.exits`` becomes the resolved exits and
    ``args.thresholds`` one threshold per exit."""
    from ..inference.dynamic import check_dynamic_settings, dynamic_exit_thresholds
    from ..inference.speculative import check_speculative_settings
    from ..inference.tokens import check_sampling

    _check_flag_combinations(parser, args)
    depth = facts.num_layers
    try:
        if args.do_sample:
            check_sampling(args.temperature, args.top_p)
        if args.draft_exit is not None:
            check_speculative_settings(
                args.draft_exit, depth, args.num_draft_tokens, args.draft_stop_threshold, args.early_draft_exits
            )
            drafting = [*args.early_draft_exits, args.draft_exit]
            warn(parser.prog, untrained_exit_warning(facts, drafting, "--draft_exit"))
        elif args.thresholds is not None:
            check_dynamic_settings(args.confidence, args.kv_fill, args.exit_on_subset, args.vocab_texts is not None)
            values = args.thresholds[0] if len(args.thresholds) == 1 else args.thresholds
            resolved = dynamic_exit_thresholds(depth, args.exits, values, facts.recorded_exits)
            args.exits, args.thresholds = list(resolved), list(resolved.values())
            warn(parser.prog, untrained_exit_warning(facts, args.exits, "--thresholds at exits"))
    except ValueError as error:
        parser.error(str(error))
    if args.num_layers is not None:
        if not 1 <= args.num_layers <= depth:
            parser.error(f"--num_layers {args.num_layers}: must be in 1..{depth} ({facts.name} has {depth} layers).")
        warn(parser.prog, untrained_exit_warning(facts, [args.num_layers], "--num_layers"))


def _stats_json(stats) -> dict:
    """A decoder's stats as JSON-ready values (tensors as lists)."""
    values = dataclasses.asdict(stats)
    return {key: value.tolist() if hasattr(value, "tolist") else value for key, value in values.items()}


def _check_prompt(parser: argparse.ArgumentParser, args: argparse.Namespace, facts: ModelFacts, length: int) -> None:
    if length == 0:
        parser.error("--prompt is empty: give the text to continue.")
    context = facts.max_positions
    if context is not None and length + args.max_new_tokens > context:
        if length >= context:
            parser.error(
                f"the prompt is {length} tokens, but {facts.name}'s context is {context} tokens "
                "(max_position_embeddings): shorten the prompt."
            )
        parser.error(
            f"the prompt ({length} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds {facts.name}'s context "
            f"of {context} tokens: lower --max_new_tokens to {context - length} or shorten the prompt."
        )


def _decode(args: argparse.Namespace, model, input_ids, vocab_subset) -> tuple:
    """Run the decoder the flags chose; returns ``(sequences, stats)``, the stats JSON-ready."""
    import torch

    from ..inference.dynamic import dynamic_generate
    from ..inference.speculative import self_speculative_generate
    from ..inference.submodel import extract_submodel

    generator = torch.Generator().manual_seed(args.seed)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p)
    if args.draft_exit is not None:
        out = self_speculative_generate(
            model, input_ids, args.draft_exit, args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
            generator=generator, draft_vocab=vocab_subset, draft_stop_threshold=args.draft_stop_threshold,
            early_draft_exits=args.early_draft_exits, **sampling,
        )  # fmt: skip
        return out.sequences, _stats_json(out.stats)
    if args.thresholds is not None:
        out = dynamic_generate(
            model, input_ids, args.exits, args.thresholds, args.max_new_tokens, confidence=args.confidence,
            kv_fill=args.kv_fill, generator=generator, check_vocab=vocab_subset, exit_on_subset=args.exit_on_subset,
            **sampling,
        )  # fmt: skip
        return out.sequences, _stats_json(out.stats)
    if args.num_layers is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its untrained-exit warning was already given
            model = extract_submodel(model, args.num_layers)
    if args.do_sample:
        torch.manual_seed(args.seed)
    sequences = model.generate(input_ids, max_new_tokens=args.max_new_tokens, **sampling)
    return sequences, {"num_layers": model.config.num_hidden_layers}


def main(argv: list[str]) -> int:
    """Run `soft-peft generate`; returns the exit status (2, with one line on stderr, for unusable flags)."""
    parser = _parser()
    args = parser.parse_args(recipe_argv(parser, list(argv)))
    if not args.prompt:
        parser.error("--prompt is empty: give the text to continue.")
    try:
        model_path = resolve_model_path(args.model_name_or_path)
        facts = read_model_facts(model_path)
        check_model_files(model_path, args.tokenizer_name_or_path)
    except ValueError as error:  # ModelNotFoundError included
        parser.error(str(error))
    _check_before_loading(parser, args, facts)

    from transformers import AutoTokenizer

    from ..checkpoints import load_causal_lm
    from ..inference.vocab import frequent_token_ids
    from ..run_guards import NonFiniteWeightsError

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or model_path, trust_remote_code=False)
    text = args.prompt.replace("\\n", "\n")
    if args.prompt_format:
        text = format_prompt(text, args.prompt_format)
    if args.chat:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    _check_prompt(parser, args, facts, input_ids.shape[1])
    vocab_subset = None
    if args.vocab_texts is not None:
        vocab_subset = frequent_token_ids(tokenizer, _read_texts(args.vocab_texts), args.vocab_size)
    try:
        model = load_causal_lm(model_path).eval()  # a PEFT adapter folder too, with its recorded exits
    except NonFiniteWeightsError as error:
        parser.error(str(error))
    try:
        sequences, stats = _decode(args, model, input_ids, vocab_subset)
    except ValueError as error:  # what only the loaded model can judge (e.g. an unsupported architecture)
        parser.error(str(error))
    print(tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True))
    print(json.dumps(stats))
    return 0
