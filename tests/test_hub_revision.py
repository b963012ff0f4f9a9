"""vLLM's hub flags: --revision, --tokenizer-revision, --download-dir and --hf-token.

The revisions are resolved by huggingface_hub itself, offline, in a hub cache laid out as the hub writes one
(``models--OWNER--NAME/refs/<branch or tag>`` holding a commit, ``snapshots/<commit>/`` its files), so what is
tested is that the flags reach the hub's own lookup, not a lookup of ours. The token, which only a download sends,
is checked where snapshot_download is called.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from server.cli import checked_sources, parse_config, with_resolved_tokenizer
from server.model_source import ModelSourceError

MODEL = "acme/tiny-gpt2"
TOKENIZER = "acme/tokenizer"
MAIN, V2 = "a" * 40, "b" * 40  # commits: main is at MAIN, the tag v2 at V2


def cache_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str]) -> None:
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, files in commits.items():
        for name, data in files.items():
            (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / commit / name).write_bytes(data)
    for ref, commit in refs.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A hub cache with two revisions of a model and of a tokenizer; the default cache (HF_HUB_CACHE) is empty."""
    hub_cache = tmp_path / "download-dir"

    def checkpoint(n_ctx: int) -> dict[str, bytes]:
        return {"config.json": json.dumps({"model_type": "gpt2", "n_ctx": n_ctx}).encode(),
                "model.safetensors": b"weights", "vocab.json": b"{}"}

    cache_repo(hub_cache, MODEL, {MAIN: checkpoint(64), V2: checkpoint(128)}, {"main": MAIN, "v2": V2})
    cache_repo(hub_cache, TOKENIZER, {MAIN: {"vocab.json": b'{"main": 0}'}, V2: {"vocab.json": b'{"v2": 0}'}},
               {"main": MAIN, "v2": V2})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-default-cache"))
    return hub_cache


def served_snapshot(*flags: str) -> Path:
    [source] = checked_sources(parse_config(["--model", MODEL, *flags], {}))
    return source.directory


def test_revision_picks_the_branch_tag_or_commit_from_the_download_dir(cache):
    assert served_snapshot("--download-dir", str(cache)).name == MAIN
    assert served_snapshot("--download-dir", str(cache), "--revision", "v2").name == V2
    assert served_snapshot("--download-dir", str(cache), "--revision", MAIN).name == MAIN
    assert json.loads((served_snapshot("--download-dir", str(cache), "--revision", "v2") / "config.json")
                      .read_text())["n_ctx"] == 128


def test_a_revision_or_cache_that_does_not_hold_the_model_is_named_in_the_error(cache):
    with pytest.raises(ModelSourceError, match=r"'acme/tiny-gpt2' at revision 'v3' is not in the hub cache .*"
                                               r"download-dir and HF_HUB_OFFLINE is set"):
        served_snapshot("--download-dir", str(cache), "--revision", "v3")
    with pytest.raises(ModelSourceError, match="'acme/tiny-gpt2' is not in the local HuggingFace cache"):
        served_snapshot()  # the default cache is not the one the model is in


def test_a_revision_is_for_hub_ids_only(cache, tiny_gpt2_dir):
    with pytest.raises(ModelSourceError, match="--revision 'v2' is for a hub id; --model .* is a local folder"):
        checked_sources(parse_config(["--model", str(tiny_gpt2_dir), "--revision", "v2"], {}))
    with pytest.raises(ModelSourceError, match="--revision 'v2' is for a hub id"):
        checked_sources(parse_config(["--model", f"x={tiny_gpt2_dir}", "--revision", "v2"], {}))


def test_tokenizer_revision_defaults_to_the_models_revision(cache):
    def tokenizer_vocab(*flags: str) -> dict:
        config = with_resolved_tokenizer(parse_config(["--model", MODEL, "--tokenizer", TOKENIZER,
                                                       "--download-dir", str(cache), *flags], {}))
        return json.loads((Path(config.load.tokenizer) / "vocab.json").read_text())

    assert tokenizer_vocab() == {"main": 0}
    assert tokenizer_vocab("--revision", "v2") == {"v2": 0}
    assert tokenizer_vocab("--tokenizer-revision", "v2") == {"v2": 0}
    assert tokenizer_vocab("--revision", "v2", "--tokenizer-revision", "main") == {"main": 0}


def test_tokenizer_revision_needs_a_hub_tokenizer(cache, tiny_gpt2_dir):
    with pytest.raises(ValueError, match="--tokenizer-revision is a revision of --tokenizer's hub id"):
        with_resolved_tokenizer(parse_config(["--model", MODEL, "--tokenizer-revision", "v2"], {}))
    with pytest.raises(ModelSourceError, match="--tokenizer-revision 'v2' is for a hub id; --tokenizer .* local"):
        with_resolved_tokenizer(parse_config(["--tokenizer", str(tiny_gpt2_dir), "--tokenizer-revision", "v2"], {}))


def test_hf_token_is_sent_with_downloads_and_kept_out_of_the_config_repr(tmp_path, monkeypatch):
    """Downloads only: the hub is asked with the token given, the saved login's (True) when bare, and by default
    none of ours (huggingface_hub then reads HF_TOKEN or the saved login itself)."""
    sent: list[object] = []

    def snapshot_download(repo_id: str, *, local_files_only: bool, token: object, **rest: object) -> str:
        if local_files_only:
            raise FileNotFoundError("not cached")
        sent.append(token)
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for flags in (["--hf-token", "hf_secret"], ["--hf-token"], []):
        with pytest.raises(ModelSourceError, match="could not be downloaded"):
            served_snapshot(*flags)
    assert sent == ["hf_secret", True, None]
    assert "hf_secret" not in repr(parse_config(["--hf-token", "hf_secret"], {}))
    assert parse_config([], {"GPTSERVE_HF_TOKEN": "hf_env"}).hub.hf_token == "hf_env"
