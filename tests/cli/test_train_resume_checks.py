"""Resume continues the run its checkpoint came from: another exit set, exit weights, base model, exit schedule, layer
dropout or (with an anneal) run length is refused naming both values unless `--allow_resume_changes`; a model of
another shape is refused in one line. All before the model loads, and nothing in the checkpoint is touched."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from example_runs import TINY_TRAIN_ARGS, save_tiny_model
from tiny_models import tiny_model, tiny_tokenizer
from train_cli_helpers import Loaded, alpaca_data, refuse_loading, train_argv
from transformers import AutoModelForCausalLM

from soft_peft.checkpoints import RUN_RECORD_FILE, run_schedule, save_run_record
from soft_peft.cli.preflight import UsageError
from soft_peft.cli.resume_checks import check_resume_matches
from soft_peft.cli.train import main as train_main
from soft_peft.settings import soft_settings

# The schedule of the run below: an anneal over its last half, so its length is recorded
SCHEDULE_FLAGS = {"exit_anneal_fraction": "0.5", "max_steps": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-step SoFT run on the tiny model (exits 2,4, `SCHEDULE_FLAGS`) with its `checkpoint-1`, and the models to
    resume onto."""
    root = tmp_path_factory.mktemp("resume-checks")
    model_dir = save_tiny_model(root / "tiny")
    same_shape = save_tiny_model(root / "other")  # another folder, same shape
    wide = root / "wide"
    config = tiny_model().config
    config.hidden_size = 64
    AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    tiny_tokenizer().save_pretrained(wide)  # a complete model folder: only its shape is wrong
    data = alpaca_data(root)
    output_dir = root / "run"
    argv = train_argv(model_dir, data, output_dir, *TINY_TRAIN_ARGS)
    argv += ["--save_strategy", "steps", "--save_steps", "1"]
    argv += [text for name, value in SCHEDULE_FLAGS.items() for text in (f"--{name}", value)]
    assert train_main(argv) == 0
    return {"model": model_dir, "same_shape": same_shape, "wide": wide, "data": data, "run": output_dir}


def folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume_argv(trained, **changes) -> list[str]:
    flags = {"model_name_or_path": str(trained["model"]), "exit_layers": "2,4", **SCHEDULE_FLAGS, **changes}
    argv = ["--dataset_name", str(trained["data"]), "--output_dir", str(trained["run"])]
    argv += ["--resume_from_checkpoint", str(trained["run"] / "checkpoint-1"), "--use_cpu", "true"]
    for name, value in flags.items():
        argv += [f"--{name}", value] if value is not None else [f"--{name}"]
    return argv


def test_the_checkpoint_records_its_run(trained):
    record = json.loads((trained["run"] / "checkpoint-1" / RUN_RECORD_FILE).read_text())
    assert record["base_model"] == str(trained["model"])
    assert record["exit_layers"] == [2, 4]
    assert record["exit_loss_weights"] == [0.25, 0.75]  # the default "last:0.75"
    assert record["base_model_config"]["hidden_size"] == 32
    assert record["schedule"] == {
        "exit_ramp_steps": 0,
        "exit_ramp_order": "deepest_first",
        "exit_rotation": 0,
        "exit_start_steps": 0,
        "exit_anneal_fraction": 0.5,
        "exit_anneal_floor": 0.0,
        "layer_dropout": 0.0,
        "layer_dropout_scale": "exp",
        "layer_dropout_ramp_steps": 0,
        "max_steps": 1,  # the anneal starts at half of the run's length
        "num_train_epochs": 3.0,  # TrainingArguments' default; max_steps overrides it
    }


# Each refused unless --allow_resume_changes: the recorded value (the run's `SCHEDULE_FLAGS`), then the new one
SCHEDULE_CHANGES = [
    ({"exit_anneal_fraction": "0.25"}, "--exit_anneal_fraction 0.5 in the checkpoint, 0.25 now"),
    ({"max_steps": "4"}, "--max_steps 1 in the checkpoint, 4 now"),  # moves the anneal's start from step 0.5 to 2
    ({"exit_rotation": "1"}, "--exit_rotation 0 in the checkpoint, 1 now"),
    ({"layer_dropout": "0.1"}, "--layer_dropout 0 in the checkpoint, 0.1 now"),
]
SCHEDULE_CHANGE_IDS = ["anneal-fraction", "max-steps-with-anneal", "rotation", "layer-dropout"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"exit_layers": "1,2,3,4"},
            "--exit_layers [2, 4] in the checkpoint, [1, 2, 3, 4] now",
        ),
        (
            {"exit_loss_weights": "uniform"},
            "--exit_loss_weights {2: 0.25, 4: 0.75} in the checkpoint, {2: 0.5, 4: 0.5} now",
        ),
        ({"model_name_or_path": "same_shape"}, "--model_name_or_path {model} in the checkpoint, {same_shape} now"),
        *SCHEDULE_CHANGES,
    ],
    ids=["exits", "weights", "base-model", *SCHEDULE_CHANGE_IDS],
)
def test_a_changed_setting_is_refused_naming_both_values(capsys, trained, change, expected, monkeypatch):
    refuse_loading(monkeypatch)
    if change.get("model_name_or_path") == "same_shape":
        change = {"model_name_or_path": str(trained["same_shape"])}
    expected = expected.replace("{model}", str(trained["model"])).replace("{same_shape}", str(trained["same_shape"]))
    before = folder_digest(trained["run"])
    assert train_main(resume_argv(trained, **change)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("soft-peft train: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0] and "--allow_resume_changes" in errors[0], errors[0]
    assert folder_digest(trained["run"]) == before


@pytest.mark.parametrize(
    "change, expected",
    [({"exit_layers": "1,2,3,4"}, "--exit_layers [2, 4] in the checkpoint, [1, 2, 3, 4] now"), *SCHEDULE_CHANGES],
    ids=["exits", *SCHEDULE_CHANGE_IDS],
)
def test_allow_resume_changes_continues_and_says_what_changed(capsys, trained, monkeypatch, change, expected):
    refuse_loading(monkeypatch)
    with pytest.raises(Loaded):
        train_main(resume_argv(trained, **change, allow_resume_changes=None))
    err = capsys.readouterr().err
    assert f"(--allow_resume_changes): {expected}" in err, err


def test_the_same_settings_resume(capsys, trained, monkeypatch):
    refuse_loading(monkeypatch)
    with pytest.raises(Loaded):
        train_main(resume_argv(trained, model_name_or_path=str(trained["model"]) + "/"))  # same folder, spelled apart
    # The epochs do not set the length while --max_steps does (as in TrainingArguments): not a change
    with pytest.raises(Loaded):
        train_main(resume_argv(trained, num_train_epochs="5"))
    assert "in the checkpoint" not in capsys.readouterr().err


def _check_schedule(checkpoint, trained, recorded, now) -> None:
    """Record `recorded` = (settings, max_steps, num_train_epochs) as the trainer would, then resume with `now`."""
    config, model = tiny_model().config.to_dict(), str(trained["model"])
    save_run_record(checkpoint, model, config, [2, 4], [0.25, 0.75], schedule=run_schedule(*recorded))
    check_resume_matches(str(checkpoint), model, [2, 4], [0.25, 0.75], schedule=run_schedule(*now))


def test_the_run_length_is_checked_only_when_an_anneal_depends_on_it(tmp_path, trained):
    checkpoint, plain, annealed = tmp_path / "checkpoint-3", soft_settings(), soft_settings(exit_anneal_fraction=0.2)
    # No anneal: a longer run moves nothing (the usual way to train on)
    _check_schedule(checkpoint, trained, (plain, 100, 3.0), (plain, 400, 3.0))
    _check_schedule(checkpoint, trained, (annealed, -1, 2.0), (annealed, -1, 2.0))
    with pytest.raises(UsageError, match=r"--num_train_epochs 2 in the checkpoint, 3 now\. Resume"):
        _check_schedule(checkpoint, trained, (annealed, -1, 2.0), (annealed, -1, 3.0))
    with pytest.raises(UsageError, match=r"--max_steps -1 in the checkpoint, 50 now\. Resume"):
        _check_schedule(checkpoint, trained, (annealed, -1, 2.0), (annealed, 50, 2.0))  # the epochs no longer count


def test_a_record_without_the_schedule_resumes_with_one_note(capsys, tmp_path, trained):
    # As an older soft-peft wrote it: nothing to compare the schedule with, which is said once
    checkpoint, model = tmp_path / "checkpoint-3", str(trained["model"])
    save_run_record(checkpoint, model, tiny_model().config.to_dict(), [2, 4], [0.25, 0.75])
    schedule = run_schedule(soft_settings(exit_rotation=1), 10, 3.0)
    check_resume_matches(str(checkpoint), model, [2, 4], [0.25, 0.75], schedule=schedule)
    err = capsys.readouterr().err
    assert err.count("does not record the exit schedule, layer dropout or run length") == 1, err


def test_a_model_of_another_shape_is_refused_in_one_line_before_loading(capsys, trained, monkeypatch):
    refuse_loading(monkeypatch)
    before = folder_digest(trained["run"])
    # Not even with --allow_resume_changes: the weights could not load
    assert train_main(resume_argv(trained, model_name_or_path=str(trained["wide"]), allow_resume_changes=None)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("soft-peft train: error: ")]
    assert len(errors) == 1 and len(err.splitlines()) < 5, err
    assert "holds a model of another shape than --model_name_or_path" in errors[0]
    assert "hidden_size 32 in the checkpoint, 64 in the model" in errors[0]
    assert f"Resume with the model it was trained from ({trained['model']})" in errors[0]
    assert folder_digest(trained["run"]) == before


def test_an_adapter_checkpoint_is_checked_against_its_recorded_base_config(tmp_path, trained):
    # An adapter checkpoint has no config.json: the base model's config comes from the record
    checkpoint = tmp_path / "checkpoint-3"
    config = tiny_model().config.to_dict()
    save_run_record(checkpoint, str(trained["model"]), config, [2, 4], [0.25, 0.75])
    with pytest.raises(UsageError, match="hidden_size 32 in the checkpoint, 64 in the model"):
        check_resume_matches(str(checkpoint), str(trained["wide"]), [2, 4], [0.25, 0.75])
    check_resume_matches(str(checkpoint), str(trained["model"]), [2, 4], [0.25, 0.75])
    save_run_record(checkpoint, "qwen", tiny_model("qwen2").config.to_dict(), [2, 4], [0.25, 0.75])
    with pytest.raises(UsageError, match="a qwen2 model in the checkpoint, a llama model in --model_name_or_path"):
        check_resume_matches(str(checkpoint), str(trained["model"]), [2, 4], [0.25, 0.75], allow_changes=True)


def test_a_checkpoint_without_a_record_is_resumed_with_a_note(capsys, tmp_path, trained):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(trained["run"] / "checkpoint-1", checkpoint)
    (checkpoint / RUN_RECORD_FILE).unlink()
    check_resume_matches(str(checkpoint), str(trained["model"]), [1, 2, 3, 4], [0.25] * 4)
    assert f"has no {RUN_RECORD_FILE} (not saved by SoFTTrainer)" in capsys.readouterr().err
    with pytest.raises(UsageError, match="another shape"):  # its config.json still gives the shape
        check_resume_matches(str(checkpoint), str(trained["wide"]), [2, 4], [0.25, 0.75])
