"""What a local model folder must hold before anything loads it: readable, complete weight files and a tokenizer.

Both faults otherwise show only after minutes of loading (a truncated ``model.safetensors`` fails deep inside
``from_pretrained`` without naming the file; a missing tokenizer fails after the weights are in memory, with advice to
install sentencepiece). Reading a safetensors header costs a few bytes, so every shard is checked.

Kept free of torch imports, like the argument parsers that use it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
import zipfile

__all__ = ["TOKENIZER_FILE_PATTERNS", "check_tokenizer_files", "check_weight_files", "weight_files"]

# Files that carry a tokenizer's vocabulary (fast, sentencepiece, BPE, WordPiece, tiktoken and Mistral's tekken);
# `tokenizer_config.json` alone has none
TOKENIZER_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer.model",
    "tekken.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
)
_SINGLE_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_FIX = "re-download or re-save the model (an interrupted copy or download leaves such a file)"


def weight_files(folder: str) -> list[str]:
    """The weight files a local model or adapter folder holds: single files, and the shards its index lists.

    Args:
        folder: A local folder.

    Returns:
        Paths, single files first; empty when the folder has none (a Hub id or a remote-code model).

    Raises:
        ValueError: for an index that cannot be read, or that lists a shard the folder lacks.
    """
    found = [os.path.join(folder, name) for name in _SINGLE_WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    for name in _INDEX_FILES:
        index = os.path.join(folder, name)
        if not os.path.isfile(index):
            continue
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index}: the weights index cannot be read ({type(error).__name__}); {_FIX}.") from None
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
        if missing:
            raise ValueError(f"{index} lists {missing[0]}, which {folder} lacks; {_FIX}.")
        found += [os.path.join(folder, shard) for shard in shards]
    return found


def _check_safetensors(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: the weights file is truncated ({size} bytes, no safetensors header); {_FIX}.")
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            raise ValueError(
                f"{path}: the weights file is truncated or not safetensors ({size} bytes, its header alone claims "
                f"{header_size}); {_FIX}."
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: the weights file has an unreadable safetensors header; {_FIX}.") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_size + max(ends, default=0)
    if size < needed:
        raise ValueError(f"{path}: the weights file is truncated ({size} of its {needed} bytes); {_FIX}.")


def _check_torch_file(path: str) -> None:
    with open(path, "rb") as handle:
        zipped = handle.read(2) == b"PK"
    # torch.save writes a zip archive; a cut one has lost its central directory at the end
    if zipped and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: the weights file is truncated (its zip archive has no end); {_FIX}.")


def check_weight_files(folder: str) -> None:
    """Refuse a local model folder whose weight files are truncated, corrupt or unreadable, naming the file.

    Args:
        folder: A local model or adapter folder; anything else (a Hub id) is not checked.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    if not os.path.isdir(folder):
        return
    for path in weight_files(folder):
        try:
            if path.endswith(".safetensors"):
                _check_safetensors(path)
            else:
                _check_torch_file(path)
        except OSError as error:
            raise ValueError(f"{path}: the weights file cannot be read ({error.strerror or error}).") from None


def check_tokenizer_files(folder: str, flag: str | None = "--tokenizer_name_or_path") -> None:
    """Refuse a local model folder that has no tokenizer.

    Args:
        folder: A local model folder; anything else (a Hub id) is not checked.
        flag: The option that passes a tokenizer from elsewhere, for the message; ``None`` where there is none.

    Raises:
        ValueError: saying the folder has no tokenizer, and how to give one.
    """
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(fnmatch.fnmatch(name, pattern) for name in names for pattern in TOKENIZER_FILE_PATTERNS):
        return
    fix = f"pass {flag} with the base model's folder or Hub id, or copy" if flag else "copy"
    raise ValueError(
        f"{folder} has no tokenizer (no tokenizer.json, tokenizer.model or vocab file; saving only the model leaves "
        f"none): {fix} the base model's tokenizer files into {folder}."
    )
