"""The learning rate a run's schedule gives each optimizer step, worked out before the model loads: a run whose rate
is 0 at every step trains nothing, which nothing else shows. Warm-up starts at rate 0, so a one-step run of a recipe
with a warm-up (`--max_steps 1`, `warmup_steps: 0.05` makes 1 warm-up step) is one; so is `learning_rate 0`."""

from __future__ import annotations

__all__ = ["zero_learning_rate_warning"]


def zero_learning_rate_warning(args) -> str | None:
    """The warning line for a run whose learning rate is 0 at every optimizer step, or None.

    The schedule is transformers' own (`get_scheduler`, as `Trainer` builds it from `lr_scheduler_type`,
    `get_warmup_steps` and `lr_scheduler_kwargs`), stepped on a one-parameter optimizer: step N trains at the rate
    the scheduler gives before its N-th `step()`, as in `Trainer`'s loop.

    Args:
        args: The run's training arguments (`SoFTConfig` or any `TrainingArguments`).

    Returns:
        None when some step has a rate above 0, or when the step count is unknown before the data loads (`max_steps`
        unset: the run is counted in epochs).
    """
    steps = args.max_steps
    if steps is None or steps <= 0:
        return None
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    warmup = args.get_warmup_steps(steps)
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    try:
        scheduler = get_scheduler(
            kind,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
    except (ValueError, TypeError):  # a schedule's own missing setting: the trainer says it, in its own words
        return None
    if not hasattr(scheduler, "get_last_lr") or kind == "reduce_lr_on_plateau":  # follows the metrics, not steps
        return None
    for _ in range(steps):
        if scheduler.get_last_lr()[0] > 0:
            return None
        optimizer.step()
        scheduler.step()
    return (
        f"the learning rate is 0 at every one of the {steps} training step(s) (learning_rate {args.learning_rate}, "
        f"{kind} schedule, {warmup} warm-up step(s)): the weights will not change. Train more steps than the "
        "warm-up (--max_steps) or shorten it (--warmup_steps)."
    )
