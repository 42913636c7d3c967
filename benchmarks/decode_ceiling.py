"""`python -m benchmarks.decode_cost ceiling`: how much self-speculative decoding can gain on this machine, two upper
bounds, measured.

Cycle times. One draft-then-verify cycle of `self_speculative_generate` at draft exit d with g drafts is timed with the
same `DecoderStack` calls it makes: g + 1 positions one at a time through layers 1..d and the draft head, layers d+1..L
and the full head on all g + 1 positions at once, and the crop. A greedy token is timed as `generate` makes it (and as
one step of the same stack, to show `generate`'s own overhead).

1. **Every draft accepted.** A cycle of g drafts yields g + 1 tokens, so (g + 1) x (greedy token) / (cycle) bounds
   the speed-up at that exit and length.
2. **A perfect draft stop.** On real prompts, greedy `generate`'s output is replayed teacher-forced, and each
   position is marked by whether exit d's draft (on the draft vocabulary) equals greedy's next token. A drafter that
   stops exactly at its first wrong draft (the ideal `draft_stop_threshold`) drafts each run of right drafts, up to
   `--max_draft` per cycle: the speed-up is the greedy time of all tokens over the sum of those cycles' times. No
   confidence rule can do better at that exit on this checkpoint.

With `--shape NAME` the model is a random-init one of that shape (`benchmarks.common.SHAPES`) on `--device`: random
weights measure the mechanics (kernel launches, cache handling, the head), which is what a GPU changes, so only the
first bound is reported. Timings are medians over interleaved rounds, so every entry was measured side by side, with
the device synchronised around each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from benchmarks.common import SHAPES, machine_line, parse_ints, random_model, synchronize
from benchmarks.decode_harness import add_model_arguments, emit, gsm8k_benchmark_data, load_model
from soft_peft.inference.stack import DecoderStack
from soft_peft.inference.tokens import exit_confidence
from soft_peft.inference.vocab import SubsetHead, frequent_token_ids


def add_ceiling_arguments(parser: argparse.ArgumentParser) -> None:
    """The `ceiling` command's flags."""
    add_model_arguments(parser)
    parser.add_argument("--shape", choices=list(SHAPES), help="A random-init model of this shape instead.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where a --shape model runs.")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="Default: fp32; --shape: bf16.")
    parser.add_argument("--draft_exits", type=parse_ints, default=[9, 12, 15, 21])
    parser.add_argument("--max_draft", type=int, default=8, help="Longest draft timed (and per perfect-stop cycle).")
    parser.add_argument("--num_prompts", type=int, default=8, help="Held-out prompts for the perfect-stop bound.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Greedy tokens per prompt to replay.")
    parser.add_argument("--new_tokens", type=int, default=64, help="Greedy tokens per `generate` timing.")
    parser.add_argument("--context", type=int, default=160, help="Cached positions before each timed cycle.")
    parser.add_argument("--rounds", type=int, default=10, help="Timed rounds; each times every entry once.")
    parser.add_argument(
        "--vocab_size", type=int, default=4096, help="Draft head's frequent-token subset; 0: full head."
    )


def draft_token_fn(stack: DecoderStack, subset: SubsetHead | None = None):
    """``draft(hidden (B, H)) -> token ids (B,)``, paying what a greedy draft costs: head, confidence, argmax."""

    def draft(hidden: torch.Tensor) -> torch.Tensor:
        logits = stack.head.logits_from_raw(hidden) if subset is None else subset.logits_from_raw(hidden)
        exit_confidence(logits)  # what `draft_stop_threshold` reads
        tokens = logits.argmax(-1)
        return tokens if subset is None else subset.token_ids[tokens]

    return draft


def cycle_timer(stack: DecoderStack, cache, context: int, draft):
    """``timer(draft_exit, drafts, stopped)``: seconds of one cycle whose ``drafts`` drafts are all accepted.

    ``stopped``: the cycle also drafted one more token that the stop refused (its layers and draft head ran, and it
    was not verified). ``draft_exit=None`` times one greedy step. The cache is cropped back to ``context`` each time.
    """
    token = torch.zeros(1, 1, dtype=torch.long, device=stack.model.device)
    device = stack.model.device.type

    def timer(draft_exit: int | None, drafts: int = 0, stopped: bool = False) -> float:
        synchronize(device)
        started = time.perf_counter()
        if draft_exit is None:  # a greedy step: every layer, then the head, on one position
            inputs = stack.step_inputs(None, context, 1, 1)
            hidden = stack.run_layers(stack.embed(token, inputs), 1, stack.num_layers, inputs, cache)
            stack.head.logits_from_raw(hidden[:, -1]).argmax(-1)
        else:
            states = []
            for offset in range(drafts + 1):
                inputs = stack.step_inputs(None, context + offset, 1, 1)
                state = stack.run_layers(stack.embed(token, inputs), 1, draft_exit, inputs, cache)
                if offset < drafts or stopped:
                    draft(state[:, -1])
                states.append(state)
            inputs = stack.step_inputs(None, context, drafts + 1, 1)
            upper = stack.run_layers(torch.cat(states, dim=1), draft_exit + 1, stack.num_layers, inputs, cache)
            stack.head.logits_from_raw(upper).argmax(-1)
        stack.crop(cache, 1, stack.num_layers, context)
        synchronize(device)
        return time.perf_counter() - started

    return timer


def generate_token_seconds(model, prompt: torch.Tensor, new_tokens: int = 64) -> float:
    """Seconds per decoded token of greedy ``generate`` (its prefill and first token subtracted)."""

    def timed(count: int) -> float:
        synchronize(model.device.type)
        started = time.perf_counter()
        model.generate(prompt, do_sample=False, max_new_tokens=count, min_new_tokens=count)
        synchronize(model.device.type)
        return time.perf_counter() - started

    return (timed(new_tokens + 1) - timed(1)) / new_tokens


def draft_hits(stack: DecoderStack, sequence: torch.Tensor, prompt_length: int, draft_exits, draft) -> dict:
    """Per draft exit, whether its draft at each generated position equals the token greedy decoding chose there.

    Args:
        sequence: ``(1, T)`` prompt plus greedy output.
        prompt_length: Where the output starts; position ``t`` drafts token ``t + 1``, from the first output token on.

    Returns:
        ``{exit: [bool, ...]}`` for output tokens ``2..`` (the first one comes from the prefill, not from a draft).
    """
    inputs = stack.step_inputs(None, 0, sequence.shape[1], 1)
    hidden, layer, cache, hits = stack.embed(sequence, inputs), 0, stack.new_cache(), {}
    for draft_exit in sorted(draft_exits):
        hidden, layer = stack.run_layers(hidden, layer + 1, draft_exit, inputs, cache), draft_exit
        drafts = draft(hidden[0, prompt_length:-1])
        hits[draft_exit] = (drafts == sequence[0, prompt_length + 1 :]).tolist()
    return hits


def perfect_stop_seconds(hits: list[bool], max_draft: int, cycle_seconds) -> tuple[float, int, int]:
    """Time, tokens and cycles of decoding the positions of ``hits`` when drafting stops at the first wrong draft.

    ``cycle_seconds(drafts, stopped)``: the time of a cycle keeping ``drafts`` drafts. Each cycle keeps a run of right
    drafts (at most ``max_draft``) and verifies one token more, which is the next token either way.
    """
    seconds, tokens, cycles, index = 0.0, 0, 0, 0
    while index < len(hits):
        run = 0
        while run < max_draft and index + run < len(hits) and hits[index + run]:
            run += 1
        # A run ends at a wrong draft (drafted, refused), at max_draft, or at the end of the output
        stopped = run < max_draft and index + run < len(hits)
        seconds += cycle_seconds(run, stopped)
        tokens += run + 1
        cycles += 1
        index += run + 1
    return seconds, tokens, cycles


def all_accepted_table(seconds: dict, greedy_token: float, draft_exits, max_draft: int, ms_digits: int = 0) -> list:
    """Markdown lines: the speed-up over `generate` if every draft is accepted, by draft exit and draft length ``g``
    (``(g + 1)`` tokens per cycle), with each cycle's milliseconds in brackets.

    Args:
        seconds: ``{(draft_exit, g, False): cycle seconds}`` as [`cycle_timer`] entries are timed.
        greedy_token: Seconds per token of greedy ``generate``.
        draft_exits, max_draft: The table's rows and its columns ``g = 1..max_draft``.
        ms_digits: Decimals of the milliseconds.
    """
    lengths = range(1, max_draft + 1)
    lines = [
        "Speed-up over `generate` if every draft is accepted, by draft length g (cycle ms in brackets):",
        "",
        "| draft exit | " + " | ".join(f"g={g}" for g in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for k in draft_exits:
        cells = [
            f"{(g + 1) * greedy_token / seconds[(k, g, False)]:.2f} ({seconds[(k, g, False)] * 1e3:.{ms_digits}f})"
            for g in lengths
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _median_times(timer, entries, rounds: int, greedy_token) -> tuple[dict, float]:
    # Every entry and one greedy-token measurement per round, so all medians come from the same stretch of time
    samples, greedy = {entry: [] for entry in entries}, []
    for _ in range(2):  # warm-up
        for entry in entries:
            timer(*entry)
    for _ in tqdm(range(rounds), desc="Timing rounds"):
        for entry in entries:
            samples[entry].append(timer(*entry))
        greedy.append(greedy_token())
    return {entry: statistics.median(values) for entry, values in samples.items()}, statistics.median(greedy)


def _load(args):
    """The model (a checkpoint, or a random-init ``--shape``), its tokenizer (``None`` for a shape) and a label."""
    if args.shape:
        dtype = getattr(torch, args.dtype or "bfloat16")
        model = random_model(args.shape, args.device, dtype).eval()
        return model, None, f"random-init `{args.shape}`"
    model, tokenizer, path = load_model(args.model_name_or_path, getattr(torch, args.dtype or "float32"))
    return model, tokenizer, f"`{path}`"


def _perfect_stop_rows(model, tokenizer, stack, draft, seconds, greedy_token, prompts, args) -> list[str]:
    """The second bound: greedy outputs of real prompts replayed, drafting stopped at the first wrong draft."""
    totals = {k: [0.0, 0, 0, 0, 0] for k in args.draft_exits}  # seconds, tokens, cycles, right drafts, drafts
    for prompt in tqdm(prompts, desc="Replaying greedy outputs"):
        encoded = tokenizer(prompt, return_tensors="pt").input_ids
        sequence = model.generate(encoded, do_sample=False, max_new_tokens=args.max_new_tokens)
        hits = draft_hits(stack, sequence, encoded.shape[1], args.draft_exits, draft)
        for k, row in hits.items():
            replay = perfect_stop_seconds(row, args.max_draft, lambda g, stop, k=k: seconds[(k, g, stop)])
            totals[k] = [sum(pair) for pair in zip(totals[k], [*replay, sum(row), len(row)], strict=True)]
    lines = [
        "",
        f"Speed-up over `generate` with a perfect draft stop, {len(prompts)} GSM8K held-out prompts, "
        f"{args.max_new_tokens} greedy tokens each, at most {args.max_draft} drafts per cycle:",
        "",
        "| draft exit | drafts equal to greedy's token | tokens per cycle | speed-up bound |",
        "|---|---|---|---|",
    ]
    for k, (spent, tokens, cycles, right, drafted) in totals.items():
        bound = tokens * greedy_token / spent
        lines.append(f"| {k} | {right / max(drafted, 1):.3f} | {tokens / max(cycles, 1):.2f} | {bound:.2f} |")
    return lines


@torch.inference_mode()
def ceiling(args: argparse.Namespace, command: str) -> int:
    """The `ceiling` command: cycle times side by side with greedy, then both bounds (the first only for a shape)."""
    torch.set_num_threads(args.threads)
    model, tokenizer, label = _load(args)
    stack = DecoderStack(model)
    bad = [k for k in args.draft_exits if not 1 <= k < stack.num_layers]
    if bad or args.max_draft < 1:
        raise SystemExit(f"--draft_exits must lie in 1..{stack.num_layers - 1} (got {bad}) and --max_draft be >= 1.")
    prompts, _, calibration = gsm8k_benchmark_data(args.data, args.num_prompts) if tokenizer else ([], [], [])
    subset = None
    if tokenizer is not None and args.vocab_size:
        subset = SubsetHead(stack.head, frequent_token_ids(tokenizer, calibration, args.vocab_size))
    draft = draft_token_fn(stack, subset)

    # Cycle times, side by side with greedy
    generator = torch.Generator().manual_seed(0)
    vocab = stack.head.lm_head.weight.shape[0]
    filler = torch.randint(3, vocab, (1, args.context), generator=generator).to(model.device)
    cache = stack.new_cache()
    inputs = stack.step_inputs(None, 0, args.context, 1)
    stack.run_layers(stack.embed(filler, inputs), 1, stack.num_layers, inputs, cache)
    timer = cycle_timer(stack, cache, args.context, draft)
    # Only the cycles the tables use: all-accepted ones of 1..max drafts, stopped ones of 0..max-1 kept drafts
    accepted = [(k, g, False) for k in args.draft_exits for g in range(1, args.max_draft + 1)]
    stopped = [(k, g, True) for k in args.draft_exits for g in range(args.max_draft)] if prompts else []
    greedy = lambda: generate_token_seconds(model, filler, args.new_tokens)  # noqa: E731
    seconds, greedy_token = _median_times(timer, [(None,), *accepted, *stopped], args.rounds, greedy)

    vocab_note = "full head" if subset is None else f"{subset.size}-token subset"
    digits = 2 if model.device.type == "cuda" else 0
    lines = [
        f"Model: {label} ({stack.num_layers} layers), {model.dtype}, torch threads={args.threads}, drafts on the "
        f"{vocab_note}; cycles timed at {args.context} cached positions, median of {args.rounds} interleaved rounds.",
        f"One greedy token: {greedy_token * 1e3:.2f} ms with `generate`, {seconds[(None,)] * 1e3:.2f} ms as one "
        "step of the layer-wise stack.",
        machine_line(),
        f"Command: `{command.strip()}`",
        "",
        *all_accepted_table(seconds, greedy_token, args.draft_exits, args.max_draft, ms_digits=digits),
    ]
    if prompts:
        lines += _perfect_stop_rows(model, tokenizer, stack, draft, seconds, greedy_token, prompts, args)
    emit(lines, "", args.output)
    return 0
