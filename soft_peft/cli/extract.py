"""`soft-peft extract`: save the standalone sub-model of a SoFT checkpoint's first N layers.

    soft-peft extract --model_name_or_path RUN --num_layers 15 --output_dir RUN-15L

The folder reloads with plain `AutoModelForCausalLM.from_pretrained`; the tokenizer is saved alongside.
"""

from __future__ import annotations

import argparse
import warnings

from ..hub import resolve_model_path
from .model_checks import read_model_facts, untrained_exit_warning, warn

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run `soft-peft extract`; returns the exit status (2, with one line on stderr, for unusable flags)."""
    parser = argparse.ArgumentParser(prog="soft-peft extract", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A local HF folder or Hub name.")
    parser.add_argument("--num_layers", type=int, required=True, help="Depth of the sub-model (an exit it trained).")
    parser.add_argument("--output_dir", required=True, help="Folder to write the sub-model (and tokenizer) to.")
    args = parser.parse_args(argv)
    try:
        model_path = resolve_model_path(args.model_name_or_path)
        facts = read_model_facts(model_path)
    except ValueError as error:  # ModelNotFoundError included
        parser.error(str(error))
    if not 1 <= args.num_layers <= facts.num_layers:
        parser.error(
            f"--num_layers {args.num_layers}: must be in 1..{facts.num_layers} ({facts.name} has {facts.num_layers} "
            "layers)."
        )
    warn(parser.prog, untrained_exit_warning(facts, [args.num_layers], "--num_layers"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inference import extract_submodel

    model = AutoModelForCausalLM.from_pretrained(model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its untrained-exit warning was already given, before loading
        submodel = extract_submodel(model, args.num_layers, copy=True)
    submodel.save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(args.output_dir)
    kept = sum(p.numel() for p in submodel.parameters()) / sum(p.numel() for p in model.parameters())
    print(f"Saved {args.num_layers}-layer sub-model ({kept:.0%} of the parameters) to {args.output_dir}")
    return 0
