"""Curriculum over training steps for the exit losses: exits ramped in, and a rotation of the early exits.

A schedule is a pure function of the optimizer step and the base weights (see [`scheduled_exit_weights`]), so it
needs no state of its own: a run resumed from a checkpoint restores ``state.global_step`` and with it the schedule,
and every micro-batch of one optimizer step (gradient accumulation) gets the same weights.

The deepest exit (normally the model's last layer) is always trained at its full base weight. The other ("early")
exits are changed in three ways, applied in this order:

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
* **Rotation** (``rotation = k > 0``): at step ``s`` only ``k`` early exits are active, positions
  ``(s * k + m) mod num_early`` for ``m < k`` (so every ``num_early`` consecutive steps train each early exit exactly
  ``k`` times). An active early exit's weight is multiplied by ``num_early / k``, so the loss *averaged over a cycle*
  equals the unrotated loss: rotation cuts cost (inactive exits never reach the head) without changing the mix.

Weights of exactly 0 mark exits that are skipped (never projected through the head) that step.

In a plain PyTorch loop pass the number of optimizer steps already taken:
``SortedLossWrapper(model, exit_rotation=2)(**batch, labels=labels, step=step)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    """

    ramp_steps: int = 0
    ramp_order: str = "deepest_first"
    rotation: int = 0
    start_steps: int = 0

    def __post_init__(self):
        if self.start_steps < 0:
            raise ValueError(f"exit_start_steps must be >= 0 (0 = exits from the first step), got {self.start_steps}.")
        if self.ramp_steps < 0:
            raise ValueError(f"exit_ramp_steps must be >= 0 (0 = no ramp), got {self.ramp_steps}.")
        if self.ramp_order not in RAMP_ORDERS:
            raise ValueError(f"exit_ramp_order must be one of {RAMP_ORDERS}, got {self.ramp_order!r}.")
        if self.rotation < 0:
            raise ValueError(f"exit_rotation must be >= 0 (0 = every exit every step), got {self.rotation}.")

    def rotates(self, num_early: int) -> bool:
        """True when the rotation trains fewer than all ``num_early`` early exits per step (below that, every exit
        trains every step)."""
        return 0 < self.rotation < num_early

    @property
    def is_constant(self) -> bool:
        """True when the schedule never changes the base weights (the default)."""
        return self.ramp_steps == 0 and self.rotation == 0 and self.start_steps == 0


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


def scheduled_exit_weights(weights: Sequence[float], step: int, schedule: ExitSchedule | None) -> list[float]:
    """The exit weights to use at optimizer step ``step``.

    Args:
        weights: Base weights, one per exit in ascending depth order (the last one is the deepest exit), summing to 1
            (see [`~soft_peft.loss.exit_loss_weights`]).
        step: Optimizer steps already taken (``TrainerState.global_step`` during the step), >= 0.
        schedule: The schedule; ``None`` or a constant schedule returns ``weights`` unchanged.

    Returns:
        One weight per exit; 0 for an exit skipped this step. With only one exit, ``weights`` unchanged.

    Raises:
        ValueError: for a negative step.
    """
    weights = [float(w) for w in weights]
    if step < 0:
        raise ValueError(f"The schedule step must be >= 0 (optimizer steps taken), got {step}.")
    num_early = len(weights) - 1
    if schedule is None or schedule.is_constant or num_early == 0:
        return weights
    if step < schedule.start_steps:  # late start: plain SFT on the deepest exit
        return [0.0] * num_early + [1.0]
    step -= schedule.start_steps  # the ramp and the rotation count from the start of the exits
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
    if not schedule.rotates(num_early):
        return ramped
    active = {(step * schedule.rotation + m) % num_early for m in range(schedule.rotation)}
    scale = num_early / schedule.rotation
    rotated = [w * scale if i in active else 0.0 for i, w in enumerate(ramped[:-1])]
    return [*rotated, ramped[-1]]
