"""Starting the engine cores: one spawned process per served model, each loading its own weights. The front
end loads only the tokenizer, from where the core's Ready says, and never imports torch. It loads it from the
model's folder while the cores load (seconds for o200k), and uses that one if Ready names the same folder.

``start_cores`` returns once every core has reported Ready; a core that cannot load its checkpoint makes it raise
``CoreLoadError`` (a ValueError, so the CLI exits 2 with the core's message, as when the front end loaded it).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import zmq

from models.tokenizer import Tokenizer, load_tokenizer
from server.config import ServerConfig
from server.engine import core_messages as wire
from server.generation_defaults import GenerationDefaults, generation_defaults
from server.model_source import ModelSource

log = logging.getLogger("gptserve")

READY_POLL_MS = 200


class CoreLoadError(ValueError):
    """An engine core could not load its model; the message is the core's own."""


@dataclass
class StartedCore:
    """A core process that reported Ready, with the sockets to it and the front end's share of its model."""

    name: str
    directory: Path  # the model's folder, where its tokenizer usually is
    process: BaseProcess
    context: zmq.Context
    commands: zmq.Socket  # PUSH: front end -> core
    outputs: zmq.Socket  # PULL: core -> front end
    socket_dir: Path
    root: str  # the path or hub id the model was given as (/v1/models' root)
    ready: wire.Ready | None = None
    tokenizer: Tokenizer | None = None
    generation: GenerationDefaults | None = None  # from its generation_config.json (server/generation_defaults.py)

    @property
    def family(self) -> str:
        assert self.ready is not None
        return self.ready.family

    def kill(self) -> None:
        """Give up on it at once (start-up failed elsewhere), if it still runs: no Shutdown, no drain."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.close()

    def close(self) -> None:
        if not self.context.closed:
            self.context.destroy(linger=0)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def start_cores(config: ServerConfig, sources: list) -> dict[str, StartedCore]:
    """Spawn every model's core and wait until each is ready."""
    cores = spawn_cores(config, sources)
    wait_for_cores(cores, config)
    return cores


def spawn_cores(config: ServerConfig, sources: list[ModelSource]) -> dict[str, StartedCore]:
    """Start every model's core; they load side by side while the caller does its own start-up."""
    started: dict[str, StartedCore] = {}
    try:
        for source in sources:
            started[source.name] = _spawn(source, config)
    except BaseException:
        for core in started.values():
            core.kill()
        raise
    return started


def wait_for_cores(cores: dict[str, StartedCore], config: ServerConfig) -> None:
    """Take each core's Ready, load its tokenizer and read its generation config; if any core fails, or a file,
    every core is killed."""
    try:
        early = {name: _tokenizer_in(core.directory) for name, core in cores.items()}  # while the cores load
        for core in cores.values():
            core.ready = _wait_ready(core)
            named = Path(core.ready.tokenizer_dir)
            preloaded = early[core.name]
            core.tokenizer = preloaded if preloaded is not None and named == core.directory else load_tokenizer(named)
            core.generation = generation_defaults(core.directory, named, core.tokenizer, config.generation_config,
                                                  config.override_generation_config)
    except BaseException:
        for core in cores.values():
            core.kill()
        raise


def _tokenizer_in(directory: Path) -> Tokenizer | None:
    """The tokenizer in a model's folder, or None if it has none (a GPT-OSS ``original/`` folder keeps it in the
    parent) or it cannot be read: then the folder that Ready names is loaded, and its error is the one reported."""
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError):
        return None


def _run_core(*args: object) -> None:
    """The spawned process's target: torch and the engine are imported there, never in the front end."""
    from server.engine.core_process import run_core

    run_core(*args)  # type: ignore[arg-type]


def _spawn(source: ModelSource, config: ServerConfig) -> StartedCore:
    name, directory = source.name, source.directory
    socket_dir = Path(tempfile.mkdtemp(prefix="gptserve-core-"))
    context = zmq.Context()
    commands, outputs = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    commands.setsockopt(zmq.SNDHWM, 0)  # a burst of requests queues here rather than blocking the event loop
    commands.bind(f"ipc://{socket_dir}/commands")
    outputs.bind(f"ipc://{socket_dir}/outputs")
    process = multiprocessing.get_context("spawn").Process(
        target=_run_core, name=f"gptserve-core-{name}",
        args=(name, directory, config, f"ipc://{socket_dir}/commands", f"ipc://{socket_dir}/outputs"),
    )
    process.start()  # not a daemon: it starts tensor-parallel ranks of its own
    log.info("started engine core", extra={"model": name, "pid": process.pid})
    return StartedCore(name, directory, process, context, commands, outputs, socket_dir, source.root)


def _wait_ready(core: StartedCore) -> wire.Ready:
    while True:
        if core.outputs.poll(READY_POLL_MS):
            message = wire.from_core.decode(core.outputs.recv())
            if isinstance(message, wire.Ready):
                return message
            if isinstance(message, wire.LoadFailed):
                core.process.join()
                if message.bad_input:
                    raise CoreLoadError(message.message)
                raise RuntimeError(f"the engine core for {core.name} failed to start: {message.message}")
        elif not core.process.is_alive():
            raise RuntimeError(f"the engine core for {core.name} exited with code {core.process.exitcode} "
                               "while loading (see the log above)")
