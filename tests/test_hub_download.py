"""A hub download cut part-way: a clear error naming the model, and its half-written snapshot never served.

``huggingface_hub.snapshot_download`` is replaced by a fake hub that behaves as the real cache does: files land in
``snapshots/<commit>/`` one at a time, a cut leaves the ones already written, and the cache lookup
(``local_files_only``) returns that snapshot folder whether or not it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from server.config import HubConfig
from server.model_source import ModelSourceError, download_from_hub, resolve_tokenizer_spec

REPO = "acme/tiny-gpt2"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


class FakeHub:
    """Serves REPO's files in order; with ``cut_before`` set, the connection drops before that file."""

    def __init__(self, cache: Path) -> None:
        self.snapshot = cache / "models--acme--tiny-gpt2" / "snapshots" / "0123abcd"
        self.cut_before: str | None = None
        index = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}}
        self.files = {"config.json": b'{"model_type": "gpt2"}',
                      "model.safetensors.index.json": json.dumps(index).encode(),
                      SHARDS[0]: b"weights-1", SHARDS[1]: b"weights-2", "vocab.json": b"{}"}

    def snapshot_download(self, repo_id: str, local_files_only: bool = False, **patterns: object) -> str:
        assert repo_id == REPO and patterns
        if local_files_only:
            if not self.snapshot.is_dir():
                raise FileNotFoundError("not cached")
            return str(self.snapshot)
        self.snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if name == self.cut_before:
                (self.snapshot / name).symlink_to(self.snapshot / f"../../blobs/{name}.incomplete")
                raise ConnectionError("peer closed connection without sending complete message body")
            (self.snapshot / name).unlink(missing_ok=True)  # a resumed download replaces a dangling link
            (self.snapshot / name).write_bytes(data)
        return str(self.snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_download_cut_part_way_is_a_clear_error(hub):
    hub.cut_before = SHARDS[1]
    with pytest.raises(ModelSourceError) as raised:
        download_from_hub(REPO, None, HubConfig())
    message = str(raised.value)
    assert REPO in message and "could not be downloaded" in message and "ConnectionError" in message


def test_half_written_snapshot_is_never_served_offline(hub, monkeypatch):
    hub.cut_before = SHARDS[1]
    with pytest.raises(ModelSourceError):
        download_from_hub(REPO, None, HubConfig())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as raised:
        download_from_hub(REPO, None, HubConfig())
    message = str(raised.value)
    assert "partly" in message and SHARDS[1] in message and "HF_HUB_OFFLINE" in message


def test_half_written_snapshot_is_finished_online_then_served(hub):
    hub.cut_before = SHARDS[1]
    with pytest.raises(ModelSourceError):
        download_from_hub(REPO, None, HubConfig())
    hub.cut_before = None
    directory = download_from_hub(REPO, None, HubConfig())
    assert all((directory / name).read_bytes() == data for name, data in hub.files.items())


def test_snapshot_lacking_a_shard_after_download_is_refused(hub):
    del hub.files[SHARDS[1]]  # the repository itself, or the allow patterns, leave a shard out
    with pytest.raises(ModelSourceError) as raised:
        download_from_hub(REPO, None, HubConfig())
    assert SHARDS[1] in str(raised.value)


def test_a_tokenizer_spec_fetches_the_tokenizer_files_of_a_hub_repository(hub, monkeypatch):
    asked: list[list[str]] = []
    fetch = hub.snapshot_download

    def recording(repo_id: str, local_files_only: bool = False, **patterns) -> str:
        asked.append(patterns["allow_patterns"])
        return fetch(repo_id, local_files_only, **patterns)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    directory = resolve_tokenizer_spec(REPO, HubConfig())
    assert (directory / "vocab.json").is_file()
    assert all("*.safetensors" not in patterns for patterns in asked)  # never the weights
    del hub.files["vocab.json"]
    (directory / "vocab.json").unlink()
    with pytest.raises(ModelSourceError, match="hub tokenizer 'acme/tiny-gpt2'.*lacks tokenizer.json or vocab.json"):
        resolve_tokenizer_spec(REPO, HubConfig())
