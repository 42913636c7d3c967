"""`soft-peft generate`: decode one prompt with a sub-model, self-speculative decoding or dynamic early exit.

    soft-peft generate --model_name_or_path RUN --prompt "Question: ...\\nAnswer: " --draft_exit 15
    soft-peft generate --model_name_or_path RUN --prompt "..." --thresholds 0.9 [--exit_layers 15,21,27]
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

from ..hub import ModelNotFoundError, resolve_model_path
from .decode_flags import parse_ints

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soft-peft generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A local HF folder or Hub name.")
    parser.add_argument("--prompt", required=True, help="Prompt text (use --chat to wrap it in the chat template).")
    parser.add_argument("--chat", action="store_true", help="Apply the tokenizer's chat template to the prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--draft_exit", type=int, help="Self-speculative decoding drafting with this exit.")
    mode.add_argument("--thresholds", help="Dynamic early exit: one threshold, or one per exit ('0.9,0.8').")
    mode.add_argument("--num_layers", type=int, help="Greedy decoding with the sub-model of the first N layers.")
    parser.add_argument("--num_draft_tokens", default="adaptive", help="Drafts per cycle (int) or 'adaptive'.")
    parser.add_argument(
        "--draft_stop_threshold", type=float, default=None, help="Stop drafting at a draft this unconfident (0..1)."
    )
    parser.add_argument(
        "--early_draft_exits",
        type=parse_ints,
        default=[],
        help="Exits below --draft_exit to draft from first ('9,12'; needs a stop).",
    )
    parser.add_argument("--exit_layers", default=None, help="Exits checked by dynamic early exit ('15,21,27').")
    parser.add_argument("--confidence", default="max_prob", choices=["max_prob", "margin"])
    parser.add_argument("--kv_fill", default="recompute", choices=["recompute", "propagate"])
    parser.add_argument("--do_sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_texts", default=None, help="Texts whose frequent tokens draft and pre-check.")
    parser.add_argument("--vocab_size", type=int, default=4096, help="Frequent tokens kept from --vocab_texts.")
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


def main(argv: list[str]) -> int:
    """Run `soft-peft generate`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model_path = resolve_model_path(args.model_name_or_path)
    except ModelNotFoundError as error:
        parser.error(str(error))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inference import dynamic_generate, extract_submodel, frequent_token_ids, self_speculative_generate

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    text = args.prompt.replace("\\n", "\n")
    if args.chat:
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(args.seed)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p)
    vocab = None
    if args.vocab_texts is not None:
        if args.draft_exit is None and args.thresholds is None:
            raise SystemExit("error: --vocab_texts needs --draft_exit or --thresholds (a decoder that drafts/checks).")
        vocab = frequent_token_ids(tokenizer, _read_texts(args.vocab_texts), args.vocab_size)
    if args.exit_on_subset and (args.thresholds is None or vocab is None):
        raise SystemExit("error: --exit_on_subset needs --thresholds and --vocab_texts (the subset to decide on).")
    if args.draft_exit is not None:
        draft_length = args.num_draft_tokens if args.num_draft_tokens == "adaptive" else int(args.num_draft_tokens)
        out = self_speculative_generate(
            model, input_ids, args.draft_exit, args.max_new_tokens, num_draft_tokens=draft_length,
            generator=generator, draft_vocab=vocab, draft_stop_threshold=args.draft_stop_threshold,
            early_draft_exits=args.early_draft_exits, **sampling,
        )  # fmt: skip
        sequences, stats = out.sequences, dataclasses.asdict(out.stats)
    elif args.thresholds is not None:
        values = [float(t) for t in args.thresholds.split(",")]
        out = dynamic_generate(
            model, input_ids, args.exit_layers, values[0] if len(values) == 1 else values, args.max_new_tokens,
            confidence=args.confidence, kv_fill=args.kv_fill, generator=generator, check_vocab=vocab,
            exit_on_subset=args.exit_on_subset, **sampling,
        )  # fmt: skip
        sequences = out.sequences
        stats = {"average_depth": out.average_depth, "exit_layers": out.exit_layers.tolist(), "checks": out.checks}
        stats["full_checks"] = out.full_checks
        stats["tokens_per_second"] = out.tokens_per_second
    else:
        if args.num_layers is not None:
            model = extract_submodel(model, args.num_layers)
        if args.do_sample:
            torch.manual_seed(args.seed)
        sequences = model.generate(input_ids, max_new_tokens=args.max_new_tokens, **sampling)
        stats = {"num_layers": model.config.num_hidden_layers}
    print(tokenizer.decode(sequences[0, input_ids.shape[1] :], skip_special_tokens=True))
    print(json.dumps(stats))
    return 0
