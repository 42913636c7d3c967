"""[`SoFTTrainer`]: TRL's `SFTTrainer` with the SoFT nested-exit loss. Change the class name, keep the script."""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import TrainingArguments
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from .checkpoints import read_run_record, run_schedule, save_adapter_exit_layers, save_run_record, saves_an_adapter
from .config import SoFTConfig, read_soft_settings
from .exits import recorded_exit_layers
from .model_card import add_soft_section, card_metadata
from .model_layout import num_decoder_layers, unwrap_model
from .resume import resolve_resume_checkpoint
from .run_guards import (
    NonFiniteGuard,
    TrainingHealth,
    check_finite_weights,
    keep_tokens_unsaved,
    nonfinite_values,
)
from .wrapper import add_sorted_exit_loss, exit_loss_weights_of

# One import path, the top level: `from soft_peft import SoFTTrainer`
__all__: list[str] = []

logger = logging.get_logger(__name__)

_SFT_TRAINER_SIGNATURE = inspect.signature(SFTTrainer.__init__)


def _default_config(model) -> SoFTConfig:
    # As `SFTTrainer` names its default output folder after the model
    name = model if isinstance(model, str) else getattr(unwrap_model(model).config, "_name_or_path", "model")
    return SoFTConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-SoFT")


class SoFTTrainer(SFTTrainer):
    """Sorted Fine-Tuning (SoFT, arXiv 2309.08968) as a drop-in replacement for TRL's [`~trl.SFTTrainer`].

    Same constructor, datasets and features as `SFTTrainer` (prompt-completion and conversational data, completion-
    and assistant-only losses, packing and padding-free batches, gradient checkpointing, `peft_config`, evaluation,
    `compute_metrics` / `preprocess_logits_for_metrics`, MoE router auxiliary losses), but the loss is the weighted
    mean over the exits of each exit's token cross-entropy: exit k applies the model's own final norm and shared LM
    head to the hidden state after k decoder layers. No parameter is added.

    Logged through `SFTTrainer`'s metrics (so every `report_to` backend gets them): `exit_{k}/loss` and
    `exit_{k}/mean_token_accuracy` for every exit, prefixed `eval_` in evaluation. `loss` stays the combined loss and
    `mean_token_accuracy` / `entropy` the model's last layer's; MoE models also log `aux_loss`, as `SFTTrainer` does.
    With an exit schedule (`exit_ramp_steps`, `exit_rotation`, `exit_start_steps`, `exit_anneal_fraction`), also
    `exit_{k}/weight` (the weights the loss used that step, annealed ones included), and an exit's loss and
    accuracy only on the steps that train it; without one, `exit_{k}/weight` once, in the first training log (the
    weights also go to `transformers.logging` at info level). With self-distillation (`exit_distill_weight > 0`) also
    `exit_{k}/distill_loss` and `exit_{k}/agreement` (top-1 agreement with the deepest exit) per early exit.
    Checkpoints are vanilla transformers models with the trained exits (weight above 0) as `soft_exit_layers` in
    `config.json`, or PEFT adapters with `soft_exit_layers` in `soft_peft_config.json` beside `adapter_config.json`.

    Args:
        model, args, ...: As for `SFTTrainer`, positionally or by name. `args` may be a [`SoFTConfig`] or any
            `SFTConfig` / `TrainingArguments`: it is kept as is (`trainer.args is args`), and the SoFT settings it
            lacks take their defaults (see [`~soft_peft.config.read_soft_settings`]; the result is
            `trainer.soft_settings`).
        final_norm (`nn.Module`, *optional*): The model's final norm, only for architectures where it is not found
            automatically.

    Guards ([`soft_peft.run_guards`]): `hub_token` stays usable but is saved as `None` in `training_args.bin`; a
    model with a NaN or infinite weight is refused; at the first step whose exit losses, or logged `loss` /
    `grad_norm`, are NaN or infinite, `train()` raises `NonFiniteTrainingError` (before any further save) with
    `on_nonfinite_loss="stop"` (the default of `soft-peft train`), or prints and logs a warning and trains on, as
    `SFTTrainer` does, with `"warn"` (the default of `SoFTConfig` and of a plain `SFTConfig`); a loss stuck at
    ln(vocabulary size) or a gradient norm of 0 for 3 logged steps prints a warning.

    Raises:
        ValueError: for settings that would remove what SoFT needs: `compute_loss_func`, label smoothing, and
            context/sequence parallelism; `NonFiniteWeightsError` (a `ValueError`) for NaN or infinite weights.
    """

    _tag_names = ["trl", "sft", "soft-peft"]
    _name = "SoFT"

    def __init__(
        self, model, args: SFTConfig | TrainingArguments | None = None, *positional, final_norm=None, **kwargs
    ):
        # Bound as `SFTTrainer` binds them, so a positional `compute_loss_func` is seen and a tokenizer is not taken
        # for one
        bound = _SFT_TRAINER_SIGNATURE.bind(self, model, args, *positional, **kwargs).arguments
        if bound.get("compute_loss_func") is not None:
            raise ValueError(
                "`compute_loss_func` is not supported by SoFTTrainer: the loss is the SoFT nested-exit loss. Tune "
                "it with `exit_layers` / `exit_loss_weights` in SoFTConfig, or subclass and override `compute_loss`."
            )
        if args is None:
            args = _default_config(model)
        self.soft_settings = read_soft_settings(args)  # before minutes are spent loading the model and data
        keep_tokens_unsaved(args)  # a push still uses the token; `training_args.bin` never holds it
        super().__init__(model, args, *positional, **kwargs)
        parallelism = self.accelerator.parallelism_config
        if parallelism is not None and (parallelism.cp_enabled or getattr(parallelism, "sp_enabled", False)):
            raise ValueError(
                "Context/sequence parallelism is not supported by SoFTTrainer: its sharded loss reduction assumes "
                "the single-exit loss. Disable `cp_size` / `sp_size` in the parallelism config."
            )
        self.exit_schedule = self.soft_settings.exit_schedule()
        target = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # NaN weights would train and save NaN; said here, before the norm probe fails on them without saying why
        check_finite_weights(target, str(getattr(target.config, "_name_or_path", "") or type(target).__name__))
        self._nonfinite = NonFiniteGuard()  # one per run: the per-step check and the logged values share its streak
        self.add_callback(
            TrainingHealth(getattr(target.config.get_text_config(), "vocab_size", None), guard=self._nonfinite)
        )
        self.exit_layers = add_sorted_exit_loss(
            target, self.soft_settings, final_norm=final_norm, last_layer_metrics=True, seed=self.args.seed
        )
        self._report_exit_weights(target)

    def _report_exit_weights(self, model: nn.Module) -> None:
        # The weights the loss really uses (explicit ones reordered to the sorted exits, schemes resolved), shown once
        # where the user looks: the log, and the first logged training step of every `report_to` backend. A schedule
        # logs `exit_{k}/weight` at every step already
        weights = exit_loss_weights_of(model)
        shown = ", ".join(f"exit {k}: {w:.4g}" for k, w in weights.items())
        logger.info(f"SoFT exit loss weights ({self.soft_settings.exit_loss_weights}): {shown}")
        if self.exit_schedule.is_constant:
            for layer, weight in weights.items():
                self._metrics["train"][f"exit_{layer}/weight"].append(weight)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # A PEFT adapter has no config.json to carry `soft_exit_layers`: record them beside the adapter
        if saves_an_adapter(self.model):
            save_adapter_exit_layers(
                output_dir, recorded_exit_layers(self.model)
            )  # the exits trained (weight above 0)
        # What a resumed run must match; written before `trainer_state.json`, which completes a checkpoint
        base = unwrap_model(self.model)
        save_run_record(
            output_dir,
            base_model=str(getattr(base.config, "_name_or_path", "")),
            base_model_config=base.config.to_dict(),
            exit_layers=self.exit_layers,
            exit_loss_weights=list(exit_loss_weights_of(self.model).values()),
            num_tokens=getattr(self, "_total_train_tokens", None),
            schedule=run_schedule(self.soft_settings, self.args.max_steps, self.args.num_train_epochs),
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` skips checkpoints cut off while saving, and a run resumed
        from a checkpoint of `SoFTTrainer` also continues TRL's `num_tokens` count.

        `Trainer` resumes from the newest `checkpoint-N` even when a kill left it without its `trainer_state.json`
        (written last), and then fails; here, as in `soft-peft train --resume_from_checkpoint`, `True` is the newest
        complete one, and each newer incomplete one it skips is printed. `SFTTrainer` keeps the token count on the
        trainer, not in the checkpoint, so a plain resumed run logs it from 0 again; the count saved with each
        checkpoint (`soft_peft_run.json`) is restored here.

        Raises:
            ValueError: for `resume_from_checkpoint=True` when `output_dir` holds no complete checkpoint.
        """
        if resume_from_checkpoint is True:
            # The command line's resolution; with no complete checkpoint a ValueError, as `Trainer` raises there too
            resume_from_checkpoint = resolve_resume_checkpoint(True, self.args.output_dir)
        checkpoint = resume_from_checkpoint
        record = read_run_record(checkpoint) if isinstance(checkpoint, str | os.PathLike) else None
        if record is not None and "num_tokens" in record and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = record["num_tokens"]
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, then the SoFT section: depth, parameters, base model, licence and exits trained."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        readme = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(readme):
            return
        base = unwrap_model(self.model)
        base_model = getattr(base.config, "_name_or_path", None) or None
        license = card_metadata(base_model).get("license") if base_model and os.path.isdir(base_model) else None
        # ZeRO-3 partitions parameters (numel 0 here): `ds_numel` is the full size
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
        add_soft_section(
            readme, license, num_layers=num_decoder_layers(base), num_parameters=parameters,
            source=model_name or os.path.basename(os.path.normpath(self.args.output_dir)), base_model=base_model,
            exits_trained=recorded_exit_layers(self.model),  # the exits trained (weight above 0)
        )  # fmt: skip

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The SoFT loss, normalised exactly like `SFTTrainer`'s; logs per-exit metrics."""
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: as in `SFTTrainer`, the forward returns the router load-balancing loss
            inputs["output_router_logits"] = True
        # The schedule follows the optimizer step: the same for every micro-batch of a step, restored on resume; an
        # anneal also follows the run's length, which a resumed run recomputes from the same arguments
        step = self.state.global_step if mode == "train" else None
        total_steps = self.state.max_steps if mode == "train" else None
        outputs = model(
            **inputs,
            soft_exit_loss=True,
            num_items_in_batch=num_items_in_batch,
            soft_exit_step=step,
            soft_exit_total_steps=total_steps,
        )
        # The exits' loss; with a router loss, without it (added below as SFTTrainer adds it). Both are top-level
        # outputs, which ZeRO-3 hooks so that the shared head is gathered again for its gradient
        loss = outputs.loss if outputs.aux_loss is None else outputs.loss_without_aux
        # As in `SFTTrainer`: `num_items_in_batch` counts the tokens of every rank, and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            # As in `SFTTrainer`: a per-micro-batch mean, averaged over the accumulation steps when the loss is summed
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_loss)
        self._log_exit_metrics(mode, inputs, outputs)
        if return_outputs:
            # `Trainer.prediction_step` wants logits: recompute them with the model's ordinary forward
            logits_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                return loss, model(**logits_inputs)
        return loss

    def _log_exit_metrics(self, mode: str, inputs: dict, outputs) -> None:
        # Summed over every rank before dividing, in one collective: the exact averages over the global batch
        stats = outputs.stats.summed(self.accelerator.gather)
        tokens = stats.num_tokens

        def per_token(total: float) -> float:
            return total / tokens if tokens else 0.0

        if mode == "train":  # every micro-batch, before its backward writes NaN into the weights
            self._stop_if_nonfinite(stats, per_token)
        metrics = self._metrics[mode]
        if mode == "train" and not self.exit_schedule.is_constant:
            for layer, weight in outputs.exit_weights.items():
                metrics[f"exit_{layer}/weight"].append(weight)
        # Only the exits computed this step (a schedule skips exits at weight 0)
        for layer, nll_sum, num_correct in zip(
            stats.computed_exits, stats.exit_nll_sums, stats.exit_num_correct, strict=True
        ):
            metrics[f"exit_{layer}/loss"].append(per_token(nll_sum))
            metrics[f"exit_{layer}/mean_token_accuracy"].append(per_token(num_correct))
        # SFTTrainer's metrics, of the model's last layer
        metrics["entropy"].append(per_token(stats.last_layer_entropy_sum))
        metrics["mean_token_accuracy"].append(per_token(stats.last_layer_num_correct))
        if stats.exit_kl_sums:  # self-distillation: one sum per early exit
            early = stats.computed_exits[:-1]
            for layer, kl_sum, num_agree in zip(early, stats.exit_kl_sums, stats.exit_num_agree, strict=True):
                metrics[f"exit_{layer}/distill_loss"].append(per_token(kl_sum))
                metrics[f"exit_{layer}/agreement"].append(per_token(num_agree))
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:  # padding-free batches carry `position_ids` instead
                local_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather(local_tokens).sum().item()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

    def _stop_if_nonfinite(self, stats, per_token) -> None:
        # The sums are gathered over every rank, so every rank stops at the same step. `Trainer` logs a NaN step's
        # loss as the running average (`logging_nan_inf_filter`), so the logs alone would not show it
        sums = zip(stats.computed_exits, stats.exit_nll_sums, strict=True)
        found = nonfinite_values({f"exit_{k}/loss": per_token(nll_sum) for k, nll_sum in sums})
        # Before this step's update: "stop" raises here, "warn" warns once per streak (the logs check the rest)
        if found:
            self._nonfinite.check(found, self.state.global_step + 1, self.args, self.accelerator.is_main_process)
