"""Test-only fault injection: make one model step fail on purpose, to prove a failed forward loses nothing else.

Set ``GPTSERVE_FAULT_INJECT_TOKEN_ID=<id>`` in the server's environment and every step whose batch feeds that
token to the model (in a prompt, or as a token a sequence generated earlier) raises ``InjectedFault`` before
the forward runs. ``GPTSERVE_FAULT_HANG_TOKEN_ID=<id>`` makes a tensor-parallel worker rank that is sent such a
step sleep forever instead (a hung rank, not a dead one). Read once, at import; unset (as in production) each
check is one comparison per step. Never set them outside tests.
"""

from __future__ import annotations

import os
import threading

from models.forward_batch import ForwardBatch
from server.engine.scheduler import ScheduledChunk

ENV_VAR = "GPTSERVE_FAULT_INJECT_TOKEN_ID"
CRASH_ENV_VAR = "GPTSERVE_FAULT_CRASH_TOKEN_ID"
HANG_ENV_VAR = "GPTSERVE_FAULT_HANG_TOKEN_ID"
_TOKEN_ID: int | None = int(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None
_CRASH_TOKEN_ID: int | None = int(os.environ[CRASH_ENV_VAR]) if os.environ.get(CRASH_ENV_VAR) else None
_ARMED = _TOKEN_ID is not None or _CRASH_TOKEN_ID is not None
_HANG_TOKEN_ID: int | None = int(os.environ[HANG_ENV_VAR]) if os.environ.get(HANG_ENV_VAR) else None


class InjectedFault(RuntimeError):
    """Raised in place of a real model failure (CUDA error, out of memory) by the test hook."""


class InjectedCrash(BaseException):
    """Escapes a step's ``except Exception``, as an engine bug outside the model would: the core's loop fails."""


def check_step(chunks: list[ScheduledChunk]) -> None:
    if not _ARMED:
        return
    for chunk in chunks:
        start = chunk.seq.num_computed_tokens
        fed = chunk.seq.token_ids[start : start + chunk.num_tokens]
        if _TOKEN_ID is not None and _TOKEN_ID in fed:
            raise InjectedFault(f"injected fault: token {_TOKEN_ID} in this step ({ENV_VAR})")
        if _CRASH_TOKEN_ID is not None and _CRASH_TOKEN_ID in fed:
            raise InjectedCrash(f"injected crash: token {_CRASH_TOKEN_ID} in this step ({CRASH_ENV_VAR})")


def hang_on_poison(batch: ForwardBatch) -> None:
    """In a worker rank: never return from a step that feeds the hang token (the process stays alive)."""
    if _HANG_TOKEN_ID is not None and _HANG_TOKEN_ID in batch.input_ids.tolist():
        threading.Event().wait()
