"""Curriculum over training steps for the exit losses: exits ramped in or annealed out, and a rotation of the early
exits.

A schedule is a pure function of the optimizer step and the base weights (see [`scheduled_exit_weights`]), so it
needs no state of its own: a run resumed from a checkpoint restores ``state.global_step`` and with it the schedule,
and every micro-batch of one optimizer step (gradient accumulation) gets the same weights.

The deepest exit (normally the model's last layer) is always trained at its full base weight. The other ("early")
exits are changed in four ways, applied in this order:

* **Late start** (``start_steps > 0``): for the first ``start_steps`` steps the early exits have weight 0 and the
  loss is plain SFT on the deepest exit; from step ``start_steps`` on they train (published early-exit results report
  that training the backbone first and the exits after beats training both jointly from the start). A ramp then
  starts counting at ``start_steps``.

* **Ramp** (``ramp_steps > 0``): each early exit's weight is multiplied by a factor that grows linearly from 0 to 1.
  ``ramp_order="all"`` ramps every early exit over steps ``[0, ramp_steps)``; ``"deepest_first"`` (as LayerSkip's
  gradual curriculum) gives the early exits consecutive windows of ``ramp_steps / num_early`` steps, the deepest one
  first, so shallower exits only start when the deeper ones are fully in. The ramped weights are renormalised to sum
  to 1 at every step: at step 0 the loss is plain SFT on the deepest exit, and after ``ramp_steps`` it is the base
  mix, with the loss scale of both unchanged.

* **Anneal** (``anneal_fraction = f > 0``): over the final fraction ``f`` of the run's ``T`` optimizer steps
  (``TrainerState.max_steps``) the early exits' share of the loss decays linearly to ``anneal_floor`` times its
  value, and the deepest exit takes the rest, so the weights still sum to 1. With ``start = T * (1 - f)``, step ``s``
  multiplies every early exit's weight by ``a(s) = 1`` while ``s + 1 <= start``, else by
  ``floor + (1 - floor) * max(0, 1 - (s + 1 - start) / (T - start))``: the last step (``s = T - 1``) gets exactly
  the floor, and with ``anneal_floor = 0`` it is plain SFT on the deepest exit. The anneal counts absolute steps
  (not from a late start), so it needs ``T`` at every training forward.

* **Rotation** (``rotation = k > 0``): at step ``s`` only ``k`` early exits are active, positions
  ``(s * k + m) mod num_early`` for ``m < k`` (so every ``num_early`` consecutive steps train each early exit exactly
  ``k`` times). An active early exit's weight is multiplied by ``num_early / k``, so the loss *averaged over a cycle*
  equals the unrotated loss: rotation cuts cost (inactive exits never reach the head) without changing the mix.

Weights of exactly 0 mark exits that are skipped (never projected through the head) that step.

In a plain PyTorch loop pass the number of optimizer steps already taken, and with an anneal the run's total:
``SortedLossWrapper(model, exit_rotation=2)(**batch, labels=labels, step=step)``,
``SortedLossWrapper(model, exit_anneal_fraction=0.1)(**batch, labels=labels, step=step, total_steps=T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import isfinite

__all__ = ["RAMP_ORDERS", "ExitSchedule", "scheduled_exit_weights"]

RAMP_ORDERS = ("deepest_first", "all")


@dataclass(frozen=True)
class ExitSchedule:
    """How the exit weights change over optimizer steps (see the module docstring).

    Attributes:
        start_steps: Steps of plain SFT (early exits at weight 0) before the early exits start; 0 = from the start.
        ramp_steps: Steps over which the early exits are ramped in (after ``start_steps``); 0 = no ramp.
        ramp_order: ``"deepest_first"`` (one exit after the other, deepest first) or ``"all"`` (all together).
        rotation: Early exits active per step besides the deepest exit; 0 = all of them every step.
        anneal_fraction: Final fraction in [0, 1) of the run's steps over which the early exits anneal; 0 = none.
        anneal_floor: Factor in [0, 1] of the early exits' weights at the last step (with ``anneal_fraction > 0``).
    """

    ramp_steps: int = 0
    ramp_order: str = "deepest_first"
    rotation: int = 0
    start_steps: int = 0
    anneal_fraction: float = 0.0
    anneal_floor: float = 0.0

    def __post_init__(self):
        if self.start_steps < 0:
            raise ValueError(f"exit_start_steps must be >= 0 (0 = exits from the first step), got {self.start_steps}.")
        if self.ramp_steps < 0:
            raise ValueError(f"exit_ramp_steps must be >= 0 (0 = no ramp), got {self.ramp_steps}.")
        if self.ramp_order not in RAMP_ORDERS:
            raise ValueError(f"exit_ramp_order must be one of {RAMP_ORDERS}, got {self.ramp_order!r}.")
        if self.rotation < 0:
            raise ValueError(f"exit_rotation must be >= 0 (0 = every exit every step), got {self.rotation}.")
        # `not (a <= x < b)` is also true for NaN; inf is out of range
        if not (isfinite(self.anneal_fraction) and 0 <= self.anneal_fraction < 1):
            raise ValueError(
                "exit_anneal_fraction must be a number in [0, 1) (the final fraction of the run's steps over which "
                f"the early exits anneal; 0 = no anneal), got {self.anneal_fraction}."
            )
        if not (isfinite(self.anneal_floor) and 0 <= self.anneal_floor <= 1):
            raise ValueError(
                "exit_anneal_floor must be a number in [0, 1] (the factor of the early exits' weights at the last "
                f"step; 0 = plain SFT on the deepest exit), got {self.anneal_floor}."
            )
        if self.anneal_floor > 0 and self.anneal_fraction == 0:
            raise ValueError(
                f"exit_anneal_floor={self.anneal_floor} has no effect without an anneal: set exit_anneal_fraction "
                "above 0 (the final fraction of the run's steps to anneal over), or leave exit_anneal_floor at 0."
            )

    def rotates(self, num_early: int) -> bool:
        """True when the rotation trains fewer than all ``num_early`` early exits per step (below that, every exit
        trains every step)."""
        return 0 < self.rotation < num_early

    @property
    def is_constant(self) -> bool:
        """True when the schedule never changes the base weights (the default)."""
        return self.ramp_steps == 0 and self.rotation == 0 and self.start_steps == 0 and not self.anneals

    @property
    def anneals(self) -> bool:
        """True when the early exits anneal at the end of the run (the schedule then needs the total steps)."""
        return self.anneal_fraction > 0

    def anneal_factor(self, step: int, total_steps: int) -> float:
        """The anneal's factor ``a(step)`` of the early exits' weights in a run of ``total_steps`` (see the module
        docstring): 1 before the anneal, ``anneal_floor`` at the last step."""
        if not self.anneals:
            return 1.0
        start = total_steps * (1 - self.anneal_fraction)
        if step + 1 <= start:
            return 1.0
        # Step s is the (s+1)-th update, as for the ramp: the last one (s = T - 1) reaches the floor exactly
        return self.anneal_floor + (1 - self.anneal_floor) * max(0.0, 1 - (step + 1 - start) / (total_steps - start))


def _ramp_factor(early_rank: int, num_early: int, step: int, schedule: ExitSchedule) -> float:
    """Factor in [0, 1] of the early exit ranked ``early_rank`` (0 = deepest early exit) at ``step``."""
    if schedule.ramp_steps == 0:
        return 1.0
    if schedule.ramp_order == "all":
        start, length = 0.0, float(schedule.ramp_steps)
    else:
        length = schedule.ramp_steps / num_early
        start = early_rank * length
    # Step s is the (s+1)-th update: the first update of a window already gets a positive share
    return min(1.0, max(0.0, (step + 1 - start) / length))


def scheduled_exit_weights(
    weights: Sequence[float], step: int, schedule: ExitSchedule | None, total_steps: int | None = None
) -> list[float]:
    """The exit weights to use at optimizer step ``step``.

    Args:
        weights: Base weights, one per exit in ascending depth order (the last one is the deepest exit), summing to 1
            (see [`~soft_peft.loss.exit_loss_weights`]).
        step: Optimizer steps already taken (``TrainerState.global_step`` during the step), >= 0.
        schedule: The schedule; ``None`` or a constant schedule returns ``weights`` unchanged.
        total_steps: Optimizer steps of the whole run (``TrainerState.max_steps``), >= 1; needed by an anneal
            (``schedule.anneal_fraction > 0``), not read otherwise.

    Returns:
        One weight per exit; 0 for an exit skipped this step. With only one exit, ``weights`` unchanged.

    Raises:
        ValueError: for a negative step, or an anneal without a positive ``total_steps``.
    """
    weights = [float(w) for w in weights]
    if step < 0:
        raise ValueError(f"The schedule step must be >= 0 (optimizer steps taken), got {step}.")
    num_early = len(weights) - 1
    if schedule is None or schedule.is_constant or num_early == 0:
        return weights
    if schedule.anneals and (total_steps is None or total_steps < 1):
        raise ValueError(
            f"exit_anneal_fraction={schedule.anneal_fraction} anneals over the end of the run, so the schedule needs "
            f"the run's total optimizer steps: pass total_steps >= 1 (got {total_steps}); SoFTTrainer passes "
            "TrainerState.max_steps, a plain loop passes `total_steps=` to SortedLossWrapper."
        )
    annealed = schedule.anneal_factor(step, total_steps) if schedule.anneals else 1.0
    if step < schedule.start_steps:  # late start: plain SFT on the deepest exit (an anneal cannot change it)
        return [0.0] * num_early + [1.0]
    step -= schedule.start_steps  # the ramp and the rotation count from the start of the exits (the anneal did not)
    # Early exits ranked from the deepest (rank 0, index num_early - 1) to the shallowest (index 0)
    ramped = [w * _ramp_factor(num_early - 1 - i, num_early, step, schedule) for i, w in enumerate(weights[:-1])]
    ramped.append(weights[-1])
    total = sum(ramped)
    if total <= 0:
        raise ValueError(
            f"At step {step} the exit ramp leaves every exit at weight 0 (base weights {weights}): the deepest exit "
            "is never ramped, so give it a positive weight in exit_loss_weights, or set exit_ramp_steps=0."
        )
    ramped = [w / total for w in ramped]
    if annealed != 1.0:  # the deepest exit takes what the early exits lose, so the weights still sum to 1
        early = [w * annealed for w in ramped[:-1]]
        ramped = [*early, 1.0 - sum(early)]
    if not schedule.rotates(num_early):
        return ramped
    active = {(step * schedule.rotation + m) % num_early for m in range(schedule.rotation)}
    scale = num_early / schedule.rotation
    rotated = [w * scale if i in active else 0.0 for i, w in enumerate(ramped[:-1])]
    return [*rotated, ramped[-1]]
