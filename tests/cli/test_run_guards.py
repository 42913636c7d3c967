"""Issue 35, items 1-4 and 12, as a user meets them: a Hub token written to disk, NaN weights, a run that diverges to
NaN, a run that collapses to the uniform distribution, and an encoder-only model, through each command.

Each refusal asserts the exit status, one error line without a traceback, and that no file changed.
"""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from example_runs import TINY_TRAIN_ARGS
from safetensors.torch import load_file
from test_bad_input import loads, refused, snapshot  # noqa: F401 (`loads` is a fixture)
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPTNeoXConfig,
    LlamaConfig,
    T5Config,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from soft_peft import SoFTConfig, SoFTTrainer
from soft_peft.cli.eval import main as eval_main
from soft_peft.cli.extract import main as extract_main
from soft_peft.cli.generate import main as generate_main
from soft_peft.cli.preflight import not_a_causal_lm
from soft_peft.cli.train import main as train_main
from soft_peft.run_guards import (
    COLLAPSE_PATIENCE,
    NonFiniteGuard,
    NonFiniteTrainingError,
    NonFiniteWeightsError,
    TrainingHealth,
    nonfinite_values,
)

FLAG_TOKEN, ENV_TOKEN = "hf_flagSecret0123456789", "hf_envSecret0123456789"


def train_argv(model_dir, data, output_dir, *flags) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir),
        *TINY_TRAIN_ARGS, *flags,
    ]  # fmt: skip


def copy_with_weights(source: Path, target: Path, change) -> Path:
    """``source``'s folder (tokenizer included) with ``change(model)`` applied to its weights."""
    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        change(model)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with one NaN in one MLP weight."""

    def one_nan(model):
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    return copy_with_weights(tiny_model_dir, tmp_path_factory.mktemp("nan") / "model", one_nan)


@pytest.fixture(scope="module")
def bert_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny BERT (an encoder) saved with the tiny model's tokenizer."""
    folder = tmp_path_factory.mktemp("bert") / "model"
    config = BertConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(folder)
    for path in tiny_model_dir.iterdir():
        if "token" in path.name:
            shutil.copy(path, folder)
    return folder


@pytest.fixture
def output_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def finished(capfd, main, argv) -> tuple[int, str, str]:
    """Run ``main(argv)`` in this process; returns ``(status, stdout, stderr)``."""
    try:
        status = main(argv)
    except SystemExit as exited:
        status = exited.code
    out, err = capfd.readouterr()
    return status, out, err


# --- 1. No secret is written --------------------------------------------------------------------------------------


def test_no_hub_token_in_anything_a_run_writes(capfd, monkeypatch, tmp_path, tiny_model_dir, alpaca_file):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    out_dir = tmp_path / "run"
    argv = train_argv(tiny_model_dir, alpaca_file, out_dir, "--hub_token", FLAG_TOKEN)
    status, out, err = finished(capfd, train_main, [*argv, "--save_strategy", "steps", "--save_steps", "1"])
    assert status == 0, err
    written = [path for path in out_dir.rglob("*") if path.is_file()]
    assert {"training_args.bin", "trainer_state.json", "README.md"} <= {path.name for path in written}
    assert len([path for path in written if path.name == "training_args.bin"]) == 3  # two checkpoints and the final
    for token in (FLAG_TOKEN, ENV_TOKEN):
        assert token not in out and token not in err
        for path in written:
            assert token.encode() not in path.read_bytes(), f"{token} written to {path}"
    saved = torch.load(out_dir / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.learning_rate == 1e-3  # the rest of the arguments kept


def test_trainer_keeps_the_token_usable_but_unsaved(tmp_path, tiny_model_dir, alpaca_file):
    # A Python script's push still gets the token; only pickles (training_args.bin) lose it
    from datasets import load_dataset

    args = SoFTConfig(tmp_path / "run", hub_token=FLAG_TOKEN, report_to="none", use_cpu=True, exit_layers=[2, 4])
    args.model_init_kwargs = {"token": FLAG_TOKEN}
    data = load_dataset("json", data_files=str(alpaca_file), split="train").rename_column("output", "completion")
    data = data.map(lambda row: {"prompt": row["instruction"]}, remove_columns=["instruction", "input"])
    trainer = SoFTTrainer(str(tiny_model_dir), args=args, train_dataset=data)
    assert trainer.args is args and args.hub_token == FLAG_TOKEN and f"{args.hub_token}" == FLAG_TOKEN
    assert FLAG_TOKEN not in repr(args.hub_token) and FLAG_TOKEN not in str(args)
    restored = pickle.loads(pickle.dumps(args))
    assert restored.hub_token is None and restored.model_init_kwargs["token"] is None
    assert restored.exit_layers == [2, 4]


# --- 2 and 12. Non-finite weights, loss and gradients -------------------------------------------------------------


def test_nan_weights_are_refused_by_train_naming_the_tensor(
    capfd, tiny_model_dir, nan_model_dir, alpaca_file, output_dir
):
    before = snapshot(output_dir, nan_model_dir)
    status, _, err = finished(capfd, train_main, train_argv(nan_model_dir, alpaca_file, output_dir))
    errors = [line for line in err.splitlines() if line.startswith("soft-peft train: error: ")]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "its weight model.layers.1.mlp.down_proj.weight holds 1 NaN or infinite value(s)" in errors[0]
    assert snapshot(output_dir, nan_model_dir) == before


def test_an_all_nan_model_is_refused_for_its_nan_not_its_norm(capfd, tmp_path, tiny_model_dir, alpaca_file):
    # Issue 35 item 12: the norm probe's "Cannot find the final norm" came first and blamed the architecture
    def all_nan(model):
        for param in model.parameters():
            param.fill_(float("nan"))

    model_dir = copy_with_weights(tiny_model_dir, tmp_path / "all-nan", all_nan)
    status, _, err = finished(capfd, train_main, train_argv(model_dir, alpaca_file, tmp_path / "out"))
    assert status == 2 and "holds" in err and "NaN or infinite" in err, err
    assert "final norm" not in err and "Traceback" not in err
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # the Python API says the same
    rows = Dataset.from_list([{"prompt": "Add 1 and 2.", "completion": " 3"}])
    with pytest.raises(NonFiniteWeightsError, match="model.embed_tokens.weight holds"):
        SoFTTrainer(model, args=SoFTConfig(tmp_path / "api", report_to="none", use_cpu=True), train_dataset=rows)


@pytest.mark.parametrize(
    "main, prefix, argv",
    [
        (generate_main, "soft-peft generate: error: ", ["--prompt", "Hi", "--max_new_tokens", "2"]),
        (extract_main, "soft-peft extract: error: ", ["--num_layers", "2", "--output_dir", "{out}/sub"]),
        (
            eval_main,
            "soft-peft eval: error: ",
            ["--dataset_name", "{data}", "--output_dir", "{out}/eval", "--exits", "2,4"],
        ),
    ],
)
def test_nan_weights_are_refused_by_every_command(capfd, nan_model_dir, alpaca_file, output_dir, main, prefix, argv):
    argv = [arg.format(out=output_dir, data=alpaca_file) for arg in argv]
    before = snapshot(output_dir, nan_model_dir)
    status, _, err = finished(capfd, main, ["--model_name_or_path", str(nan_model_dir), *argv])
    errors = [line for line in err.splitlines() if line.startswith(prefix)]
    assert status == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "its weight model.layers.1.mlp.down_proj.weight holds 1 NaN" in errors[0]
    assert snapshot(output_dir, nan_model_dir) == before


def assert_finite_checkpoints(output_dir: Path) -> None:
    for weights in output_dir.glob("checkpoint-*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), f"{weights} holds NaN"


@pytest.mark.parametrize(
    "logging_steps, expected",
    [("1", "training diverged at step 2: grad_norm nan"), ("100", "training diverged at step 3: exit_2/loss nan")],
)
def test_a_run_that_diverges_stops_without_a_final_save(
    capfd, tmp_path, tiny_model_dir, alpaca_file, logging_steps, expected
):
    # learning rate 1e4: step 2's gradients are NaN, and from step 3 the loss. With logs every 100 steps the Trainer's
    # own log would hide the NaN loss (`logging_nan_inf_filter`): the trainer checks every step's exit losses
    out_dir = tmp_path / "run"
    flags = ["--learning_rate", "1e4", "--max_steps", "6", "--logging_steps", logging_steps]
    flags += ["--save_strategy", "steps", "--save_steps", "1"]
    status, _, err = finished(capfd, train_main, train_argv(tiny_model_dir, alpaca_file, out_dir, *flags))
    errors = [line for line in err.splitlines() if line.startswith("soft-peft train: error: ")]
    assert status == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0] and "Lower --learning_rate (now 10000)" in errors[0]
    assert not (out_dir / "model.safetensors").exists() and not (out_dir / "config.json").exists()
    if logging_steps == "1":  # stopped at the log, before step 2's checkpoint
        assert sorted(path.name for path in out_dir.glob("checkpoint-*")) == ["checkpoint-1"]
        assert_finite_checkpoints(out_dir)


def test_nonfinite_values_reads_the_training_keys():
    logs = {"loss": 1.0, "grad_norm": math.inf, "exit_2/loss": math.nan, "entropy": math.nan, "learning_rate": 1.0}
    assert list(nonfinite_values(logs)) == ["grad_norm", "exit_2/loss"]
    assert list(nonfinite_values(logs, grad_norm_may_overflow=True)) == ["exit_2/loss"]  # fp16's skipped steps
    assert nonfinite_values({"loss": 2.0, "grad_norm": 0.5}) == {}


# --- 3. A collapsed run is said -----------------------------------------------------------------------------------


def health_logs(health: TrainingHealth, logs: list[dict], capsys) -> list[str]:
    args, control = TrainingArguments("unused", report_to="none"), TrainerControl()
    for step, entry in enumerate(logs, 1):
        health.on_log(args, TrainerState(global_step=step), control, logs=entry)
    return [line for line in capsys.readouterr().err.splitlines() if "looks collapsed" in line]


def test_collapse_warns_once_after_the_patience(capsys):
    uniform = math.log(101)
    at_uniform = [{"loss": uniform + 0.001, "grad_norm": 0.3}] * (COLLAPSE_PATIENCE + 2)
    warnings = health_logs(TrainingHealth(101), at_uniform, capsys)
    assert len(warnings) == 1 and f"= {uniform:.4g}, a uniform guess" in warnings[0]
    no_gradient = [{"loss": 2.0, "grad_norm": 0.0}] * COLLAPSE_PATIENCE
    assert "the gradient norm is 0" in health_logs(TrainingHealth(101), no_gradient, capsys)[0]
    # A streak broken by a learning step, a loss away from ln(V) and eval logs do not warn
    broken = [{"loss": uniform, "grad_norm": 0.0}] * (COLLAPSE_PATIENCE - 1) + [{"loss": 3.0, "grad_norm": 1.0}]
    broken += [{"eval_loss": uniform}] + [{"loss": uniform + 0.1, "grad_norm": 1.0}] * COLLAPSE_PATIENCE
    assert health_logs(TrainingHealth(101), broken, capsys) == []


def test_a_collapsed_run_prints_a_warning(capfd, tmp_path, tiny_model_dir, alpaca_file):
    # Final norm and head at 0: every logit is 0 (loss ln(101)) and no gradient reaches any weight
    def collapse(model):
        model.model.norm.weight.zero_()
        model.lm_head.weight.zero_()

    model_dir = copy_with_weights(tiny_model_dir, tmp_path / "collapsed", collapse)
    argv = train_argv(model_dir, alpaca_file, tmp_path / "run", "--max_steps", str(COLLAPSE_PATIENCE))
    status, _, err = finished(capfd, train_main, argv)
    warnings = [line for line in err.splitlines() if "[soft-peft] warning: the run looks collapsed" in line]
    assert status == 0 and len(warnings) == 1, err
    assert "ln(vocabulary size) = 4.615" in warnings[0] and "the gradient norm is 0" in warnings[0]


# --- 4. Encoder-only models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "main, prefix, argv",
    [
        (
            train_main,
            "soft-peft train: error: ",
            ["--dataset_name", "{data}", "--output_dir", "{out}", "--use_cpu", "true"],
        ),
        (generate_main, "soft-peft generate: error: ", ["--prompt", "Hi", "--max_new_tokens", "2"]),
        (extract_main, "soft-peft extract: error: ", ["--num_layers", "2", "--output_dir", "{out}/sub"]),
        (
            eval_main,
            "soft-peft eval: error: ",
            ["--dataset_name", "{data}", "--output_dir", "{out}/eval", "--exits", "2,4"],
        ),
    ],
)
def test_an_encoder_only_model_is_refused_before_loading(
    capsys, request, bert_dir, alpaca_file, output_dir, main, prefix, argv
):
    counted = request.getfixturevalue("loads")  # counts (and fails) every `from_pretrained`
    argv = ["--model_name_or_path", str(bert_dir), *[arg.format(out=output_dir, data=alpaca_file) for arg in argv]]
    error = refused(capsys, main, argv, prefix, counted, output_dir, bert_dir)
    assert "a BertConfig (BertForMaskedLM) is an encoder-only model" in error
    assert "SoFT needs a decoder-only causal LM" in error


def test_causal_lm_classification():
    assert not_a_causal_lm(LlamaConfig()) is None
    assert not_a_causal_lm(GPTNeoXConfig()) is None  # its `is_decoder=False` is unused: GPT-NeoX is causal
    assert not_a_causal_lm(BertConfig(is_decoder=True)) is None  # BERT as a decoder attends causally
    assert "encoder-only" in not_a_causal_lm(BertConfig())
    assert "encoder-decoder" in not_a_causal_lm(T5Config())


def test_on_nonfinite_loss_warn_trains_on_and_says_so_once(capfd, tmp_path, tiny_model_dir, alpaca_file):
    """`--on_nonfinite_loss warn` is SFTTrainer's behaviour (TRL's own tests train through NaN): the run ends, exit
    0, with one warning for the streak of bad steps instead of the error."""
    out_dir = tmp_path / "run"
    flags = ["--learning_rate", "1e4", "--max_steps", "4", "--logging_steps", "1", "--on_nonfinite_loss", "warn"]
    status, _, err = finished(capfd, train_main, train_argv(tiny_model_dir, alpaca_file, out_dir, *flags))
    assert status == 0, err
    warned = [line for line in err.splitlines() if "training diverged at step" in line]
    assert len(warned) == 1 and warned[0].startswith("[soft-peft] warning: training diverged at step 2"), err
    assert "Training goes on, as on_nonfinite_loss is 'warn'" in warned[0]
    assert (out_dir / "model.safetensors").exists()


def test_the_guard_stops_or_warns_by_the_arguments(capsys):
    """`SoFTConfig` (and a plain `SFTConfig`, which has no such field) warns, as SFTTrainer trains on; "stop" raises;
    a finite step ends a streak, so the next bad one warns again."""
    guard, nan = NonFiniteGuard(), {"loss": float("nan")}
    with pytest.raises(NonFiniteTrainingError, match="training diverged at step 3: loss nan"):
        guard.check(nan, 3, SimpleNamespace(learning_rate=0.1, on_nonfinite_loss="stop"))
    for step, found in [(4, nan), (5, nan), (6, {}), (7, nan)]:
        guard.check(found, step, SimpleNamespace(learning_rate=0.1))  # no field: SFTTrainer's behaviour
    warned = [line for line in capsys.readouterr().err.splitlines() if "training diverged" in line]
    assert [line.split("step ")[1][0] for line in warned] == ["4", "7"]
    assert SoFTConfig(output_dir="x", bf16=False).on_nonfinite_loss == "warn"
    with pytest.raises(ValueError, match="on_nonfinite_loss must be one of"):
        SoFTConfig(output_dir="x", bf16=False, on_nonfinite_loss="ignore")
