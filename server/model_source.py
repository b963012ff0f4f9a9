"""From a ``--model`` spec (PATH, NAME=PATH or a hub id) to a served name and a local checkpoint directory, and
from a ``--tokenizer`` spec (PATH or a hub id) to a local tokenizer directory.

Nothing here loads weights; it only decides where they are, so a bad spec fails before any slow work starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.tokenizer import TOKENIZER_FILES
from server.config import HubConfig

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "gpt2"
DEMO_MODEL_NAME = "gpt2-tiny-random-demo"
# Only what the loader reads: GPT-OSS repos also ship original/ and metal/ copies of the weights.
HUB_IGNORE_PATTERNS = ["original/*", "metal/*"]


class ModelSourceError(ValueError):
    """A spec that names no usable checkpoint; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str  # the id clients put in the request's "model" field
    directory: Path
    root: str  # the path or hub id it was given as (/v1/models' root, as vLLM's)


def resolve_model_spec(spec: str, hub: HubConfig) -> ModelSource:
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(_default_name(path), _local(path, spec, hub), spec)
    name, sep, target = spec.partition("=")
    if sep:
        if not name or not target:
            raise ModelSourceError(f"--model {spec!r}: NAME=PATH needs both a name and a path")
        target_path = Path(target).expanduser()
        if target_path.is_dir():
            return ModelSource(name, _local(target_path, spec, hub), target)
        return ModelSource(name, download_from_hub(target, hub.revision, hub), target)
    if _looks_like_path(spec):
        raise ModelSourceError(f"--model {spec!r}: directory {path} does not exist")
    return ModelSource(spec, download_from_hub(spec, hub.revision, hub), spec)


def _local(path: Path, spec: str, hub: HubConfig) -> Path:
    """A folder has no revisions: --revision with one is a mistake, not something to ignore."""
    if hub.revision is not None:
        raise ModelSourceError(f"--revision {hub.revision!r} is for a hub id; --model {spec!r} is a local folder")
    return path


def default_model_source(hub: HubConfig) -> ModelSource:
    """``gpt2`` from the HF cache or hub; failing that, a tiny random-weight demo model written once locally."""
    try:
        return ModelSource(DEFAULT_HUB_ID, download_from_hub(DEFAULT_HUB_ID, hub.revision, hub), DEFAULT_HUB_ID)
    except ModelSourceError as e:
        directory = demo_model_directory()
        # info, not a warning: on a fresh offline machine this is the documented first run, not a fault
        log.info(
            "no --model given and %s; serving %s, a tiny GPT-2 with RANDOM weights from %s: its text is noise",
            e, DEMO_MODEL_NAME, directory,
        )
        return ModelSource(DEMO_MODEL_NAME, directory, str(directory))


@dataclass(frozen=True, slots=True)
class SnapshotFiles:
    """What is fetched of a hub repository, and what a snapshot must hold to be used."""

    what: str  # "model" or "tokenizer", as errors name it
    allow_patterns: tuple[str, ...]
    missing: Callable[[Path], list[str]]


def resolve_tokenizer_spec(spec: str, hub: HubConfig) -> Path:
    """``--tokenizer``: a folder with the tokenizer's files, or a hub id whose tokenizer files are fetched."""
    path = Path(spec).expanduser()
    revision = hub.tokenizer_revision or hub.revision
    if path.is_dir():
        if hub.tokenizer_revision is not None:
            raise ModelSourceError(f"--tokenizer-revision {revision!r} is for a hub id; --tokenizer {spec!r} is a "
                                   "local folder")
        if _missing_tokenizer_files(path):
            raise ModelSourceError(f"--tokenizer {spec!r}: {path} holds neither {' nor '.join(TOKENIZER_FILES)}")
        return path
    if _looks_like_path(spec):
        raise ModelSourceError(f"--tokenizer {spec!r}: directory {path} does not exist")
    return download_from_hub(spec, revision, hub, TOKENIZER)


def download_from_hub(repo_id: str, revision: str | None, hub: HubConfig, files: SnapshotFiles | None = None) -> Path:
    """The local snapshot of a hub model (or only its tokenizer): the cache first, the network only when the hub
    is not set offline.

    A download cut part-way leaves a snapshot folder with some files in it, which the hub's cache lookup may
    still return: a snapshot is used only once every file the loader needs is there.
    """
    from huggingface_hub import snapshot_download

    files = files or CHECKPOINT

    def snapshot(local_files_only: bool) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub.download_dir, token=hub.hf_token,
                                      local_files_only=local_files_only, allow_patterns=list(files.allow_patterns),
                                      ignore_patterns=HUB_IGNORE_PATTERNS))

    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    cache = f"the hub cache {hub.download_dir}" if hub.download_dir else "the local HuggingFace cache"
    missing: list[str] = []
    try:
        cached = snapshot(local_files_only=True)
        missing = files.missing(cached)
        if not missing:
            return cached
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    if _hub_offline():
        state = (f"is only partly in {cache} (missing {', '.join(missing)}: an interrupted download? run once "
                 "online to finish it)") if missing else f"is not in {cache}"
        raise ModelSourceError(f"hub {files.what} {at} {state} and HF_HUB_OFFLINE is set")
    try:
        directory = snapshot(local_files_only=False)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end the same way
        raise ModelSourceError(
            f"hub {files.what} {at} is not in {cache} and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    missing = files.missing(directory)
    if missing:
        raise ModelSourceError(f"hub {files.what} {at}: the downloaded snapshot {directory} lacks "
                               f"{', '.join(missing)}")
    return directory


def _missing_checkpoint_files(directory: Path) -> list[str]:
    """What the loader would need and the snapshot lacks: config.json and every safetensors file named (a
    dangling link, left where the hub's blob never finished, counts as missing)."""
    if not (directory / "config.json").is_file():
        return ["config.json"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return [index.name]
    else:
        shards = ["model.safetensors"]
    return [name for name in shards if not (directory / name).is_file()]


def _missing_tokenizer_files(directory: Path) -> list[str]:
    return [] if any((directory / name).is_file() for name in TOKENIZER_FILES) else [" or ".join(TOKENIZER_FILES)]


CHECKPOINT = SnapshotFiles("model", ("*.json", "*.safetensors", "*.txt"), _missing_checkpoint_files)
TOKENIZER = SnapshotFiles("tokenizer", ("*.json", "*.txt", "*.jinja"), _missing_tokenizer_files)


def demo_model_directory() -> Path:
    """Written once under the user's cache dir; a temporary sibling renamed into place keeps it whole."""
    from models.demo_checkpoint import write_demo_gpt2

    cache_root = _writable_cache_root()
    directory = cache_root / DEMO_MODEL_NAME
    if (directory / "config.json").is_file():
        return directory
    staging = Path(tempfile.mkdtemp(prefix=DEMO_MODEL_NAME, dir=cache_root))
    write_demo_gpt2(staging / "model")
    try:
        (staging / "model").rename(directory)
    except OSError:  # another process won the race; its copy is identical
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return directory


def _writable_cache_root() -> Path:
    """$XDG_CACHE_HOME/gptserve or ~/.cache/gptserve, made if missing; where neither can be written (a
    read-only or missing home in a container), a new private temp dir: the demo is rewritten each start."""
    try:
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptserve"
        user_cache.mkdir(parents=True, exist_ok=True)
        if os.access(user_cache, os.W_OK):
            return user_cache
    except (OSError, RuntimeError):  # RuntimeError: Path.home() with no HOME and no passwd entry
        pass
    return Path(tempfile.mkdtemp(prefix="gptserve-"))


def _default_name(path: Path) -> str:
    """The directory's base name; a GPT-OSS ``original/`` folder is named after its parent."""
    resolved = path.resolve()
    return resolved.parent.name if resolved.name == "original" else resolved.name


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep + os.sep in spec or spec.count("/") > 1


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
