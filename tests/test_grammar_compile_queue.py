"""Constraints wait for the engine core's one compile thread, where a wide regex takes seconds: a compiled one
never waits behind another's compile, and no more than MAX_PENDING_COMPILES new ones may wait (a 429)."""

from __future__ import annotations

import asyncio
import time

import pytest

from models.loader import load_model
from server.cli import checked_sources, parse_config
from server.engine import core_messages as wire
from server.engine.core_client import MAX_PENDING_COMPILES, EngineCoreClient
from server.engine.core_startup import start_cores
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.errors import QueueFull
from server.engine.sampling_params import GrammarSpec
from tests.inproc_core import InprocCore

QUICK = GrammarSpec(regex="[0-9]{3}", param="structured_outputs")


def slow(i: int) -> GrammarSpec:
    """~2 s to compile on GPT-2's vocabulary (bench/NOTES.md, session 19): a wide class, counted."""
    return GrammarSpec(regex=f"{i}.{{0,250}}", param="structured_outputs")


def test_a_compiled_constraint_is_answered_while_another_compiles(tiny_gpt2_dir):
    engine = LLMEngine(load_model(tiny_gpt2_dir, dtype="float32", device="cpu"), EngineConfig(kv_cache_tokens=256))
    engine.grammars.compile(QUICK)
    inproc = InprocCore(engine)
    try:
        inproc.send(wire.CompileGrammar(1, slow(0)))
        inproc.send(wire.CompileGrammar(2, QUICK))
        inproc.core._apply_commands()
        answer = inproc.receive(timeout_s=1.0)
        assert isinstance(answer, wire.GrammarCompiled) and answer.ticket == 2 and answer.error is None
        assert not inproc.core._compiles[1].done(), "the slow compile was still running"
        inproc.core._compiles[1].result(timeout=60)
    finally:
        inproc.close()


async def flood(client: EngineCoreClient) -> None:
    await client.compile_grammar(QUICK)
    waiting = [asyncio.create_task(client.compile_grammar(slow(i))) for i in range(MAX_PENDING_COMPILES)]
    await asyncio.sleep(0.1)  # every task has sent its spec and waits
    with pytest.raises(QueueFull):
        await client.compile_grammar(slow(MAX_PENDING_COMPILES))
    await asyncio.wait_for(client.compile_grammar(QUICK), 5.0)  # compiled before: neither refused nor queued
    assert not any(task.done() for task in waiting)
    for task in waiting:
        task.cancel()


def test_one_more_new_constraint_than_may_wait_is_a_429_but_a_compiled_one_is_served(tiny_gpt2_dir):
    config = parse_config(["--device", "cpu", "--kv-cache-tokens", "256", "--model", f"tiny={tiny_gpt2_dir}"], {})
    core = start_cores(config, checked_sources(config))["tiny"]

    async def run() -> float:
        client = EngineCoreClient(core, max_queue=8)
        client.start()
        await flood(client)
        started = time.monotonic()
        await client.shutdown(timeout=0)
        return time.monotonic() - started

    try:
        stopped_in = asyncio.run(run())
    finally:
        core.kill()
    assert core.process.exitcode == 0 and stopped_in < 15, "the queued compiles (~30 s) were dropped at shutdown"
