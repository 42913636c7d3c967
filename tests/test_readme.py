"""Every Python block of README.md and docs/guide.md runs as written, offline, and does what its text says; the README
stays short and its links land.

How the Hub is replaced (nothing in the blocks' text changes):
- Models: the Hub id `HuggingFaceTB/SmolLM2-135M` is served from a temporary Hugging Face cache (HF_HUB_OFFLINE=1 is
  set for tests), holding a tiny random Llama, or the real SmolLM2-135M-Instruct folder for the blocks whose exits
  need its 30 layers (those are `slow`).
- Datasets: `datasets.load_dataset("trl-lib/Capybara", ...)` returns the Alpaca seed tasks shipped in data/ as
  conversations.
- Training: `SoFTConfig` gets a tiny run on top of the block's own arguments (1 step, batch 2, 64 tokens).
Each block runs in a temporary folder holding a link to data/, as it would from the repository root; a block run
alone finds the folder an earlier block saves (the inference block's `smollm2-soft`) as a link to the served model.
`test_readme_runs_top_to_bottom` runs the README's blocks in order in one folder, as a reader does.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset
from huggingface_hub import constants
from tiny_models import NUM_LAYERS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import soft_peft
from soft_peft import recorded_exit_layers
from soft_peft.checkpoints import load_causal_lm
from soft_peft.exits import default_exit_layers

ROOT = Path(__file__).resolve().parents[1]
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
FAKE_COMMIT = "0" * 40
LOAD_DATASET = datasets.load_dataset
TINY_RUN = {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64, "report_to": "none"}
TINY_RUN.update(save_strategy="no", logging_steps=1)
README_MAX_CHARS = 10_500  # a newcomer's five-minute read; reference material goes to docs/guide.md
REPOSITORY_URL = "https://github.com/soft-peft/soft-peft/blob/main/"
DOCS = ["README.md", "CONTRIBUTING.md", "docs/guide.md", "docs/measurements.md"]
# A repository path a document names in its text or commands: `recipes/zero3.yaml`, `tests/test_serving.py`, ...
NAMED_PATH = re.compile(
    r"(?<![\w/.])(?:benchmarks|data|docs|examples|recipes|tests|tools)/[\w/.-]+\.(?:py|yaml|jsonl|sbatch|sh|md)"
)
# A shipped recipe or launch config by name (`smollm2_135m_alpaca_cpu`, `accelerate/zero3`) after `--config`,
# `recipes copy` or `recipes path`
RECIPE_NAME = re.compile(r"(?:--config|recipes copy|recipes path) (\w+[_/][\w/]+)(?=[\s)\"`])")


def python_blocks(document: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / document).read_text(), flags=re.S | re.M)


# Each document's Python blocks, each found by a line only it contains: whether it needs the real model's 30 layers
SNIPPETS = {
    "README.md": {
        "# was: from trl import SFTConfig, SFTTrainer": False,
        "peft_config=LoraConfig(": False,
        "soft.save_pretrained(": False,
        "out = self_speculative_generate(": True,
    },
    "docs/guide.md": {
        "exit_ramp_steps=100, exit_rotation=2": False,
        "draft_vocab=vocab": True,
    },
}
CASES = [(document, key) for document, keys in SNIPPETS.items() for key in keys]
# The folder a block loads that an earlier block of its document saves
LOADS_EARLIER_OUTPUT = {"out = self_speculative_generate(": "smollm2-soft"}


@pytest.mark.parametrize("document", SNIPPETS)
def test_every_block_is_listed_once(document):
    blocks = python_blocks(document)
    found = [[key for key in SNIPPETS[document] if key in block] for block in blocks]
    assert found == [[key] for key in SNIPPETS[document]], f"{document}: add each new block to SNIPPETS"


def test_the_readme_is_a_five_minute_read():
    length = len((ROOT / "README.md").read_text())
    assert length <= README_MAX_CHARS, f"README.md has {length} characters; move reference material to docs/guide.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(heading) for heading in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("document", DOCS)
def test_links_land(document):
    """Relative links (and the README's absolute ones, which PyPI can follow) name a file of this repository, and a
    heading of it where they give an anchor."""
    text = (ROOT / document).read_text()
    targets = [
        (ROOT / name, anchor)
        for name, anchor in re.findall(re.escape(REPOSITORY_URL) + r"([^)#\s]+)#?([^)\s]*)", text)
    ]
    for name, anchor in re.findall(r"\]\((?!https?:|mailto:)([^)#\s]*)#?([^)\s]*)\)", text):
        targets.append(((ROOT / document).parent / name if name else ROOT / document, anchor))
    assert targets, f"{document} links nowhere"
    broken = [f"{path.relative_to(ROOT)}#{anchor}" for path, anchor in targets if not path.resolve().exists()]
    broken += [
        f"{path.relative_to(ROOT)}#{anchor}" for path, anchor in targets if anchor and anchor not in anchors(path)
    ]
    assert broken == []


@pytest.mark.parametrize("document", DOCS)
def test_named_files_exist(document):
    text = (ROOT / document).read_text()
    missing = [name for name in NAMED_PATH.findall(text) if not (ROOT / name).exists()]
    missing += [name for name in RECIPE_NAME.findall(text) if not (ROOT / "recipes" / f"{name}.yaml").exists()]
    assert missing == [], f"{document} names what the repository does not have"


def serve_from_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as the cached snapshot of `repo_id` (the layout `hf_hub_download` reads offline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    for file in folder.iterdir():
        (snapshot / file.name).symlink_to(file.resolve())


def capybara_from_alpaca_seed(*args, **kwargs) -> Dataset:
    if args[0] != "trl-lib/Capybara":  # local files load as usual
        return LOAD_DATASET(*args, **kwargs)
    lines = (ROOT / "data" / "alpaca_seed" / "seed_tasks_alpaca.jsonl").read_text().splitlines()[:8]
    turns = [json.loads(line) for line in lines]
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": t["instruction"]},
                    {"role": "assistant", "content": t["output"]},
                ]
            }
            for t in turns
        ]
    )


def offline_work_folder(model_folder: Path, tmp_path: Path, monkeypatch) -> Path:
    """The folder the blocks run in (the current directory), with the Hub model served from `model_folder`, the
    Capybara dataset replaced and `SoFTConfig` given the tiny run."""
    cache = tmp_path / "hub-cache"
    serve_from_hub_cache(cache, HUB_MODEL, model_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(datasets, "load_dataset", capybara_from_alpaca_seed)
    config_class = soft_peft.SoFTConfig
    monkeypatch.setattr(soft_peft, "SoFTConfig", lambda **kwargs: config_class(**{**kwargs, **TINY_RUN}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(work)
    return work


def exec_block(document: str, key: str) -> dict:
    snippet = next(snippet for snippet in python_blocks(document) if key in snippet)
    namespace: dict = {"__name__": "readme"}
    exec(compile(snippet, f"{document} block {key!r}", "exec"), namespace)
    return namespace


def run_snippet(document: str, key: str, model_folder: Path, tmp_path: Path, monkeypatch) -> dict:
    work = offline_work_folder(model_folder, tmp_path, monkeypatch)
    if key in LOADS_EARLIER_OUTPUT:  # run alone: the earlier block's output is the served model itself
        (work / LOADS_EARLIER_OUTPUT[key]).symlink_to(model_folder.resolve())
    return exec_block(document, key)


def logged_exit_losses(trainer) -> dict[int, float]:
    """The `exit_{k}/loss` values of the trainer's first training log."""
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {int(m[1]): value for name, value in logs.items() if (m := re.fullmatch(r"exit_(\d+)/loss", name))}


def check_quickstart(namespace: dict, work: Path) -> None:
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    assert not trainer.args.bf16  # the block itself turns bf16 off without a GPU
    losses = logged_exit_losses(trainer)  # the paper's exits of the model's depth, each logged
    assert sorted(losses) == default_exit_layers(NUM_LAYERS)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values())
    assert_inference_folder(work / "smollm2-soft", sorted(losses))


def assert_inference_folder(folder: Path, exits: list[int]) -> None:
    """`folder` is what the inference block's "your SoFT checkpoint's folder, e.g. smollm2-soft" loads: a tokenizer
    and a model that records its exits."""
    AutoTokenizer.from_pretrained(folder)
    assert recorded_exit_layers(AutoModelForCausalLM.from_pretrained(folder)) == exits


def check_lora(namespace: dict, work: Path) -> None:
    trainer = namespace["trainer"]
    trainable = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)  # the head and the norm stay frozen
    losses = logged_exit_losses(trainer)
    assert sorted(losses) == default_exit_layers(NUM_LAYERS)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values())
    # The saved adapter records its exits and, loaded on its base model, computes what the trained model computes
    adapter = work / "smollm2-soft-lora"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert json.loads((adapter / "soft_peft_config.json").read_text())["soft_exit_layers"] == sorted(losses)
    reloaded = load_causal_lm(str(adapter)).eval()
    assert recorded_exit_layers(reloaded) == sorted(losses)
    input_ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=input_ids).logits
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected)


def check_plain_pytorch(namespace: dict, work: Path) -> None:
    exits = default_exit_layers(NUM_LAYERS)
    losses = namespace["out"].exit_losses
    assert sorted(losses) == exits and all(torch.isfinite(loss) for loss in losses.values())
    assert namespace["model"].get_output_embeddings().weight.grad is not None  # backward reached the shared head
    saved = AutoModelForCausalLM.from_pretrained(work / "smollm2-plain-loop")
    torch.testing.assert_close(saved.state_dict(), namespace["model"].state_dict())
    assert_inference_folder(work / "smollm2-plain-loop", exits)


def check_schedule(namespace: dict, work: Path) -> None:
    assert torch.isfinite(namespace["out"].loss)
    before = AutoModelForCausalLM.from_pretrained(HUB_MODEL).state_dict()
    after = namespace["model"].state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # three optimizer steps trained it


def assert_greedy(namespace: dict, **draft) -> None:
    """Self-speculative decoding as the block calls it gives `generate`'s greedy tokens."""
    model, input_ids = namespace["model"], namespace["input_ids"]
    expected = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    out = soft_peft.self_speculative_generate(model, input_ids, max_new_tokens=8, **draft)
    assert torch.equal(out.sequences, expected)


def check_inference(namespace: dict, work: Path) -> None:
    assert namespace["small"].config.num_hidden_layers == 15
    out, input_ids = namespace["out"], namespace["input_ids"]
    assert out.sequences.shape[0] == 1 and torch.equal(out.sequences[:, : input_ids.shape[1]], input_ids)
    assert out.sequences.shape[1] > input_ids.shape[1]
    assert_greedy(namespace, draft_exit=15, attention_mask=namespace["mask"])


def check_vocabulary_subsets(namespace: dict, work: Path) -> None:
    vocab = namespace["vocab"]
    # At most 4096 distinct ids (300 GSM8K completions hold fewer distinct tokens)
    assert vocab.dim() == 1 and 0 < vocab.numel() <= 4096 and vocab.unique().numel() == vocab.numel()
    assert_greedy(namespace, draft_exit=24, draft_vocab=vocab)  # "same outputs"


CHECKS = {
    "# was: from trl import SFTConfig, SFTTrainer": check_quickstart,
    "peft_config=LoraConfig(": check_lora,
    "soft.save_pretrained(": check_plain_pytorch,
    "out = self_speculative_generate(": check_inference,
    "exit_ramp_steps=100, exit_rotation=2": check_schedule,
    "draft_vocab=vocab": check_vocabulary_subsets,
}


@pytest.fixture
def tiny_model_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("document", "key"), [case for case in CASES if not SNIPPETS[case[0]][case[1]]])
def test_block_runs_with_a_tiny_model(document, key, tiny_model_folder, tmp_path, monkeypatch):
    namespace = run_snippet(document, key, tiny_model_folder, tmp_path, monkeypatch)
    CHECKS[key](namespace, tmp_path / "work")


@pytest.mark.slow
@pytest.mark.parametrize(("document", "key"), [case for case in CASES if SNIPPETS[case[0]][case[1]]])
def test_block_runs_with_the_real_model(document, key, smollm2_path, tmp_path, monkeypatch):
    namespace = run_snippet(document, key, smollm2_path, tmp_path, monkeypatch)
    CHECKS[key](namespace, tmp_path / "work")


def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    """A reader who runs every README block in order, in one folder, decodes with the model SoFTTrainer trained: no
    later block overwrites its folder (the plain PyTorch block once saved its untrained model there)."""
    folder = tmp_path / "tiny-30"  # the depth of SmolLM2, so that the README's exits (9, ..., 30; draft 15) exist
    tiny_model("llama", num_hidden_layers=30).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    work = offline_work_folder(folder, tmp_path, monkeypatch)
    base = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    trained = None
    for key in SNIPPETS["README.md"]:
        namespace = exec_block("README.md", key)
        if key == "# was: from trl import SFTConfig, SFTTrainer":
            trained = {name: value.clone() for name, value in namespace["trainer"].model.state_dict().items()}
    assert trained is not None and any(not torch.equal(trained[name], base[name]) for name in base)  # it trained
    assert (work / "smollm2-plain-loop" / "config.json").exists()  # the plain loop's model, in a folder of its own
    loaded = namespace["model"].state_dict()  # the inference block's, the last block
    assert loaded.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(loaded[name], trained[name], rtol=0, atol=0)
