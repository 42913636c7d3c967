"""Where a model comes from: an existing local folder, else the Hugging Face Hub, checked once and quickly.

`transformers` retries an unreachable Hub for about 30 s before it fails with a connection error that does not say
whether a local folder was meant. [`resolve_model_path`] decides first, in one short request (or none, offline or
cached), and fails with one line that names both possibilities and the fix.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["ModelNotFoundError", "looks_like_hub_id", "push_folders_to_hub", "resolve_model_path"]

# "name" or "namespace/name" as the Hub accepts them; anything else can only be a local path
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_PROBE_TIMEOUT_S = 10.0


class ModelNotFoundError(ValueError):
    """A model is neither a local folder nor obtainable from the Hub (offline, unreachable, or no such model)."""


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repository id (``name`` or ``namespace/name``, no ``..``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".json", ".jsonl", ".git"))


def _http_transport_error() -> type[Exception]:
    # huggingface_hub 1.x talks to the Hub through httpx, 2.x through httpx2: take the error class of the one in use
    from huggingface_hub import get_session

    return sys.modules[type(get_session()).__module__.split(".")[0]].TransportError


def resolve_model_path(name_or_path: str, revision: str | None = None) -> str:
    """Check that ``from_pretrained(name_or_path)`` can find the model, before anything slow runs.

    An existing local folder is used as is. Otherwise ``name_or_path`` must be a Hub id that is either in the local
    Hugging Face cache or served by the Hub (one request, ``HF_HUB_OFFLINE`` respected).

    Args:
        name_or_path: A model folder, or a Hub id such as ``HuggingFaceTB/SmolLM2-135M``.
        revision: The Hub revision that will be loaded (branch, tag or commit), if not the default.

    Returns:
        The folder (with ``~`` expanded), or the Hub id unchanged.

    Raises:
        ModelNotFoundError: one line saying there is no such local folder and why the Hub cannot provide it.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelNotFoundError(f"{name_or_path} is a file; a model is a folder holding config.json, or a Hub id.")
    if not looks_like_hub_id(name_or_path):
        raise ModelNotFoundError(f"{name_or_path}: no such local folder (and not a Hub model id).")
    cached = huggingface_hub.try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str):
        return name_or_path
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{name_or_path}: no such local folder, and the Hub could not be reached (HF_HUB_OFFLINE=1 is set and "
            "the model is not in the Hugging Face cache). Pass a local model folder, or unset HF_HUB_OFFLINE."
        )
    api = huggingface_hub.HfApi()
    try:
        info = api.model_info(name_or_path, revision=revision, timeout=_PROBE_TIMEOUT_S)
        # A gated model's card is public, its weights are not: without access, loading fails after the data is read
        if getattr(info, "gated", False):
            api.auth_check(name_or_path)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{name_or_path} is a gated model, and this machine's Hub token has no access to it: accept its licence "
            f"on https://huggingface.co/{name_or_path}, then `hf auth login` (or set HF_TOKEN)."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        what = f"revision {revision!r} of {name_or_path}" if isinstance(error, RevisionNotFoundError) else "it"
        raise ModelNotFoundError(
            f"{name_or_path}: no such local folder, and the Hub does not serve {what} (check the spelling; a "
            "private or gated model needs `hf auth login`)."
        ) from None
    except (_http_transport_error(), OfflineModeIsEnabled) as error:
        raise ModelNotFoundError(
            f"{name_or_path}: no such local folder, and the Hub could not be reached ({type(error).__name__}: "
            f"{error}). Pass a local model folder, or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache."
        ) from None
    return name_or_path


def push_folders_to_hub(
    folders: dict[str, str], private: bool | None = None, token: str | None = None, commit_message: str | None = None
) -> list[str]:
    """Upload each saved model folder to its own Hub repository (created if missing), one commit per repository.

    Args:
        folders: ``{repo_id: folder}``: a sub-model, or a family of them (one repository per exit).
        private: Create missing repositories private (``None``: the Hub's default).
        token: A Hub token (``None``: the one from ``hf auth login`` or ``HF_TOKEN``).
        commit_message: The commit message (default: ``"Upload <folder name> with soft-peft"``).

    Returns:
        The repositories' URLs, in the order given.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    urls = []
    for repo_id, folder in folders.items():
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload {os.path.basename(os.path.normpath(folder))} with soft-peft"
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=message, repo_type="model")
        urls.append(str(url))
    return urls
