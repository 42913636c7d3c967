"""A frequent-token slice of the shared LM head: cheap exit logits for drafting and confidence pre-checks.

On a small model the head is a large share of each exit's cost (SmolLM2-135M: 28M of 135M parameters, the weight
reading of about eight decoder layers). Most generated tokens come from a small part of the vocabulary, so an exit that
only drafts or pre-checks can score that part alone, as frequency-ranked speculative sampling (FR-Spec) and dynamic
vocabulary pruning for early exit do. Nothing here changes what the full model decides: drafts are still verified
with the full head, and an early exit is still confirmed with it.

A *vocabulary subset* is a sorted 1-D tensor of unique token ids ([`frequent_token_ids`] builds one). The decoders take
one under the name of the role it plays: ``self_speculative_generate(draft_vocab=...)``, the tokens the draft exit may
propose, and ``dynamic_generate(check_vocab=...)``, the tokens the confidence pre-check scores; the CLI builds it from
``--vocab_texts`` / ``--vocab_size`` for either. [`SubsetHead`] is the exit head restricted to one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..exit_head import ExitHead

__all__ = ["SubsetHead", "frequent_token_ids"]

_TOKENIZE_BATCH = 512


def frequent_token_ids(tokenizer, texts: Iterable[str], size: int = 8192) -> torch.Tensor:
    """The ``size`` most frequent token ids in ``texts``, plus the tokenizer's special tokens, sorted.

    Count them on text like what the model will generate (its training completions, say), not on the prompts to be
    decoded. Ties are broken by the lower id; tokens never seen are left out even when fewer than ``size`` were seen.

    Args:
        tokenizer: A transformers tokenizer.
        texts: Calibration texts.
        size: Number of frequent tokens to keep (special tokens come on top).

    Returns:
        A sorted 1-D LongTensor of unique ids, for ``self_speculative_generate(draft_vocab=...)`` and
        ``dynamic_generate(check_vocab=...)``.

    Raises:
        ValueError: for ``size < 1`` or no calibration text.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be an int >= 1, got {size!r}.")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("`texts` is empty: pass calibration texts, such as the training completions.")
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    for start in tqdm(range(0, len(texts), _TOKENIZE_BATCH), desc="Counting tokens", disable=len(texts) <= 4096):
        encoded = tokenizer(texts[start : start + _TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        flat = torch.tensor([token for row in encoded for token in row], dtype=torch.long)
        counts += torch.bincount(flat, minlength=counts.numel())[: counts.numel()]
    seen = int((counts > 0).sum())
    # A stable sort on negated counts keeps lower ids first among equal counts
    ranked = torch.sort(-counts, stable=True).indices[: min(size, seen)]
    special = torch.tensor([t for t in tokenizer.all_special_ids if t is not None and t >= 0], dtype=torch.long)
    return torch.unique(torch.cat([ranked, special]))


class SubsetHead:
    """The exit head (final norm, projection, LM head, logit post-processing) scoring only ``token_ids``.

    The head's rows for ``token_ids`` are copied once (``len(token_ids) x H`` values). A head that is not a plain
    ``nn.Linear`` (a LoRA-adapted or ``modules_to_save`` head under PEFT) is run in full and sliced instead, with a
    warning: correct, but no faster.

    Args:
        head: The model's [`~soft_peft.exit_head.ExitHead`] (``find_exit_head(model)``, or a
            [`DecoderStack`]'s ``.head``).
        token_ids: 1-D ids in ``0..V-1``, unique (from [`frequent_token_ids`], say).

    Attributes:
        token_ids: The subset's ids, on the head's device; column ``j`` of [`logits`] scores ``token_ids[j]``.
        vocab_size: ``V``, the full head's vocabulary size.

    Raises:
        ValueError: for ids that are not a non-empty 1-D integer sequence of unique in-range values.
    """

    def __init__(self, head: ExitHead, token_ids: torch.Tensor | Sequence[int]):
        if not isinstance(head, ExitHead):
            hint = "`stack.head`" if isinstance(getattr(head, "head", None), ExitHead) else "`find_exit_head(model)`"
            raise ValueError(f"SubsetHead needs the model's ExitHead, got {type(head).__name__}; pass {hint}.")
        self.head = head
        lm_head = head.lm_head
        self.vocab_size = vocab_size = lm_head.weight.shape[0]
        ids = torch.as_tensor(token_ids)
        if ids.ndim != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"The vocabulary subset must be a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)} "
                f"and dtype {ids.dtype}; build one with `frequent_token_ids(tokenizer, texts, size)`."
            )
        ids = ids.long()
        if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
            raise ValueError(f"The vocabulary subset has ids outside 0..{vocab_size - 1} (the head's vocabulary).")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("The vocabulary subset has repeated ids; pass each id once.")
        self.token_ids = ids.to(lm_head.weight.device)
        self.weight = self.bias = None
        if type(lm_head) is nn.Linear:
            self.weight = lm_head.weight.index_select(0, self.token_ids)
            self.bias = None if lm_head.bias is None else lm_head.bias.index_select(0, self.token_ids)
        else:
            warnings.warn(
                f"The LM head is a {type(lm_head).__name__}, not a plain nn.Linear (an adapted head under PEFT?): "
                "the vocabulary subset is sliced from full logits, which is correct but not faster. Merge the "
                "adapter (`merge_and_unload()`) for the speed-up.",
                stacklevel=3,
            )

    @property
    def size(self) -> int:
        """Number of token ids in the subset."""
        return self.token_ids.numel()

    def logits_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Subset logits ``(..., K)`` of raw hidden states ``(..., H)``, column ``j`` scoring ``token_ids[j]``."""
        normed = self.head.normed_from_raw(raw)  # (..., H)
        if self.weight is None:
            scores = self.head.lm_head(normed).index_select(-1, self.token_ids)
        else:
            scores = F.linear(normed, self.weight, self.bias)
        return self.head.post_process(scores)  # (..., K)

    def to_vocab(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter subset values ``(..., K)`` (probabilities, say) into zeros of the full vocabulary ``(..., V)``."""
        full = values.new_zeros(*values.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.token_ids, values)
