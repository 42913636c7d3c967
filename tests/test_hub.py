"""`resolve_model_path`: a local folder is used as is; a Hub id is checked once, quickly, without the network here
(offline mode, a closed local port, a local server answering 404, or a patched probe)."""

from __future__ import annotations

import http.server
import sys
import threading
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants

from soft_peft.hub import ModelNotFoundError, looks_like_hub_id, resolve_model_path

UNREACHABLE = "no such local folder, and the Hub could not be reached"


@pytest.fixture
def online(monkeypatch):
    """Leave offline mode (the test suite runs with HF_HUB_OFFLINE=1) for code that reads it at call time."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_an_existing_folder_is_used_as_is(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert resolve_model_path(f"~/{tmp_path.name}") == str(tmp_path)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"0")
    with pytest.raises(ModelNotFoundError, match="is a file; a model is a folder"):
        resolve_model_path(str(tmp_path / "model.bin"))


@pytest.mark.parametrize("name", ["./runs/nothere", "/no/such/folder", "a/b/c", "../up"])
def test_a_missing_path_that_cannot_be_a_hub_id(name):
    assert not looks_like_hub_id(name)
    with pytest.raises(ModelNotFoundError, match="no such local folder \\(and not a Hub model id\\)"):
        resolve_model_path(name)


def test_hub_ids_are_recognised():
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and looks_like_hub_id("gpt2")
    assert looks_like_hub_id("runs/nothere")  # could be either: the Hub is asked, and the message names both


def test_offline_and_not_cached_fails_at_once_naming_both_possibilities():
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model_path("runs/nothere")
    assert time.perf_counter() - start < 2.0
    assert str(raised.value).startswith(f"runs/nothere: {UNREACHABLE} (HF_HUB_OFFLINE=1 is set")
    assert "\n" not in str(raised.value)


def test_a_cached_hub_model_needs_no_request(monkeypatch):
    def cached(repo_id, filename, revision=None, **kwargs):
        return f"/cache/{repo_id}/{filename}"

    def no_request(*args, **kwargs):
        raise AssertionError("a cached model must not be probed")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_request)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_a_hub_id_is_probed_once_with_a_short_timeout(online, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: calls.append((a, k)))
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M", revision="main") == "HuggingFaceTB/SmolLM2-135M"
    assert calls == [(("HuggingFaceTB/SmolLM2-135M",), {"revision": "main", "timeout": 10.0})]


@pytest.mark.parametrize("gated, access", [(False, None), ("manual", True), ("auto", False)])
def test_a_gated_model_without_access_is_refused_before_loading(online, monkeypatch, gated, access):
    """The paper's `meta-llama/Llama-2-13b-hf` is gated: its card is public, its weights need an accepted licence."""
    from huggingface_hub.errors import GatedRepoError

    # The HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x) builds the error's response
    client = sys.modules[type(huggingface_hub.get_session()).__module__.split(".")[0]]

    checked = []

    def auth_check(self, repo_id, **kwargs):
        checked.append((repo_id, kwargs))
        if not access:
            response = client.Response(401, request=client.Request("GET", f"https://huggingface.co/{repo_id}"))
            raise GatedRepoError("Access to model is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: SimpleNamespace(gated=gated))
    monkeypatch.setattr(huggingface_hub.HfApi, "auth_check", auth_check)
    name = "meta-llama/Llama-2-13b-hf"
    if access is False:
        with pytest.raises(ModelNotFoundError) as raised:
            resolve_model_path(name)
        assert str(raised.value) == (
            f"{name} is a gated model, and this machine's Hub token has no access to it: accept its licence on "
            f"https://huggingface.co/{name}, then `hf auth login` (or set HF_TOKEN)."
        )
    else:
        assert resolve_model_path(name) == name
    assert checked == ([(name, {})] if gated else [])


def test_an_unreachable_hub_fails_at_once(online, monkeypatch):
    with socket_on_closed_port() as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        start = time.perf_counter()
        with pytest.raises(ModelNotFoundError) as raised:
            resolve_model_path("runs/nothere")
    assert time.perf_counter() - start < 5.0
    message = str(raised.value)
    assert message.startswith(f"runs/nothere: {UNREACHABLE} (ConnectError")
    assert "set HF_HUB_OFFLINE=1" in message and "\n" not in message


class _RepoNotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server name)
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_hub_without_the_model_says_so(online, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RepoNotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ModelNotFoundError, match="runs/nothere: no such local folder, and the Hub does not serve"):
            resolve_model_path("runs/nothere")
    finally:
        server.shutdown()
        server.server_close()


class socket_on_closed_port:  # noqa: N801 (used as a context manager)
    """An endpoint URL whose port nothing listens on: connecting is refused at once."""

    def __enter__(self) -> str:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))  # reserved but not listening
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()
