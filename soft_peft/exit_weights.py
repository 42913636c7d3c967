"""The ``exit_loss_weights`` setting: how the exits' losses are combined, parsed in one place.

A scheme (``"last:w"``, ``"uniform"``, ``"linear"``) or one weight per exit, always normalised to sum to 1 so that the
SoFT loss is a weighted *mean* of the exits' losses. "Last" in ``"last:w"`` is the deepest exit: the last of
``exit_layers`` in order of depth, which is the model's last layer when the exits end there (as the default exits do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_EXIT_LOSS_WEIGHTS", "exit_loss_weights", "parse_exit_loss_weights"]

# "last:w": the deepest exit, the last of the exits in order of depth, keeps the share w
_LAST_SHARE_PREFIX = "last:"

# The default mix: the deepest exit keeps 3/4 of the loss and the early exits share 1/4. The equal-budget quality study
# (docs/results.md) chose it: the paper's mean over exits ("uniform") costs the full model far more quality
DEFAULT_EXIT_LOSS_WEIGHTS = "last:0.75"

_WEIGHT_SCHEMES = ("uniform", "linear")


def parse_exit_loss_weights(spec: str | Sequence[float]) -> str | list[float]:
    """Check an ``exit_loss_weights`` setting without knowing the exits: the one parser of the setting.

    Args:
        spec: As for [`exit_loss_weights`].

    Returns:
        The scheme, lower-cased (``"uniform"``, ``"linear"`` or ``"last:w"``), or the explicit weights as floats.

    Raises:
        ValueError: for an unknown name, a ``last:`` share outside ``(0, 1]``, a weight that is not a number, negative,
            NaN or infinite, or explicit weights whose sum is 0 or overflows.
    """
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in _WEIGHT_SCHEMES:
            return name
        if name.startswith(_LAST_SHARE_PREFIX):
            _last_share(name[len(_LAST_SHARE_PREFIX) :], spec)
            return name
        try:
            raw = [float(w) for w in name.replace(" ", ",").split(",") if w]
        except ValueError:
            raise ValueError(
                f"exit_loss_weights={spec!r} is not 'uniform', 'linear', 'last:w' (such as 'last:0.5') or a "
                "list of numbers such as '1,1,2'."
            ) from None
    else:
        try:
            raw = [float(w) for w in spec]
        except (TypeError, ValueError):
            raise ValueError(f"exit_loss_weights={list(spec)!r} holds a value that is not a number.") from None
    if not raw:
        raise ValueError(f"exit_loss_weights={spec!r} gives no weight; give one number per exit, such as '1,1,2'.")
    if not all(math.isfinite(w) and w >= 0 for w in raw):
        raise ValueError(
            f"exit_loss_weights={raw} has a negative, NaN or infinite weight; each weight must be a finite number "
            ">= 0 (they are normalised to sum to 1, so '1,1,2' is enough)."
        )
    total = sum(raw)
    if not math.isfinite(total):  # e.g. 1e308 + 1e308: normalising would give NaN or 0 weights
        raise ValueError(
            f"exit_loss_weights={raw} sums to {total}, which overflows; use smaller numbers (they are normalised "
            "to sum to 1, so '1,1,2' is enough)."
        )
    if total <= 0:
        raise ValueError(f"exit_loss_weights={raw} sums to {total}; at least one weight must be positive.")
    return raw


def exit_loss_weights(
    spec: str | Sequence[float], exit_layers: Sequence[int], written_order: Sequence[int] | None = None
) -> list[float]:
    """Normalised per-exit loss weights.

    Every scheme is normalised to sum to 1, so that [`sorted_exit_loss`] is a weighted *mean* of the exits' losses:
    with equal per-exit cross-entropies it equals that cross-entropy, as plain SFT's loss would.

    Args:
        spec: ``"uniform"`` (the paper: the mean over exits), ``"linear"`` (weight proportional to the exit's depth,
            so deeper exits weigh more), ``"last:w"`` with ``0 < w <= 1`` (the deepest exit keeps weight ``w``, the
            other exits share ``1 - w`` equally; ``"last:0.5"`` puts half the loss on the deepest exit whatever
            the number of exits; with a single exit its weight is 1; "last" is the last exit in order of depth, the
            model's last layer only when ``exit_layers`` ends there, as the default exits do), a comma-separated
            string ``"1,1,2"`` or a list with one finite, non-negative weight per exit.
        exit_layers: The exits, ascending.
        written_order: The same exits in the order the user wrote them, which explicit weights follow
            (``exit_layers=[30, 9]`` with weights ``[1, 0]`` gives exit 30 the weight 1). Default: ascending.

    Returns:
        Weights summing to 1, one per exit of ``exit_layers`` (ascending).

    Raises:
        ValueError: as [`parse_exit_loss_weights`], and for a count that is not one weight per exit.
    """
    parsed = parse_exit_loss_weights(spec)
    if parsed == "uniform":
        raw = [1.0] * len(exit_layers)
    elif parsed == "linear":
        raw = [float(k) for k in exit_layers]
    elif isinstance(parsed, str):  # "last:w"
        raw = _last_share_weights(_last_share(parsed[len(_LAST_SHARE_PREFIX) :], spec), len(exit_layers))
    else:
        if len(parsed) != len(exit_layers):
            raise ValueError(
                f"exit_loss_weights has {len(parsed)} values but there are {len(exit_layers)} exits "
                f"{list(written_order or exit_layers)}: give one weight per exit, or a scheme: 'last:0.75' (the "
                "default), 'uniform' or 'linear'."
            )
        if written_order is not None:
            if sorted(written_order) != list(exit_layers):
                raise ValueError(f"written_order {list(written_order)} is not an order of {list(exit_layers)}.")
            by_layer = dict(zip(written_order, parsed, strict=True))
            parsed = [by_layer[k] for k in exit_layers]
        raw = parsed
    total = sum(raw)
    return [w / total for w in raw]


def _last_share(text: str, spec) -> float:
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # also rejects NaN
        raise ValueError(
            f"exit_loss_weights={spec!r}: the deepest exit's share must be a number in (0, 1], such as 'last:0.5'."
        )
    if share == 0.0:
        # Refused rather than followed: 'last:w' is the scheme that protects the full model, and a share of 0 leaves
        # it untrained, almost always a slip. Explicit weights remain the deliberate way to write it
        raise ValueError(
            f"exit_loss_weights={spec!r} gives the deepest exit (with the default exits, the full model) weight 0, "
            "so it would not be trained. Use a share above 0 such as 'last:0.75'; to leave it untrained on purpose, "
            "give one weight per exit ending in 0, such as '1,1,0'."
        )
    return share


def _last_share_weights(share: float, num_exits: int) -> list[float]:
    if num_exits == 1:
        return [1.0]  # a single exit is plain SFT whatever the share
    return [(1.0 - share) / (num_exits - 1)] * (num_exits - 1) + [share]
