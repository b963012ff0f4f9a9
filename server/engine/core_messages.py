"""What crosses the boundary between the front end and an engine-core process: msgspec Structs, msgpack-framed.

Only token ids, sampling parameters and per-step outputs travel; text never does (the front end tokenizes and
detokenizes). Every message is a tagged Struct, so one typed decoder per direction reads them without pickle.
The records inside (SamplingParams, ChoiceOutput, EngineStats, Admission) are the engine's own dataclasses,
which msgspec encodes field by field.
"""

from __future__ import annotations

import msgspec

from server.engine.admission import Admission
from server.engine.engine_stats import EngineStats
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import GrammarSpec, SamplingParams

MetricEvent = tuple[str, tuple[int | float | str, ...]]  # a ModelMetrics method's name and its arguments


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class StopChoice(msgspec.Struct, tag=True, array_like=True):
    """The front end matched a stop string in this choice's text."""

    request_id: str
    index: int


class CompileGrammar(msgspec.Struct, tag=True, array_like=True):
    """Compile (or find cached) a request's grammar before it is admitted; answered by GrammarCompiled."""

    ticket: int
    spec: GrammarSpec


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Stop stepping, stop the tensor-parallel ranks, exit 0."""


ToCore = AddRequest | Abort | StopChoice | CompileGrammar | Shutdown


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The weights are loaded and the KV pool sized: what the front end needs to admit requests on its own."""

    admission: Admission
    stats: EngineStats
    family: str  # "gpt2" | "gpt_oss": which chat format the front end speaks
    tokenizer_dir: str  # where the front end loads the same tokenizer from
    hidden_size: int  # the width of the model's final hidden states: an embedding's dimensions


class LoadFailed(msgspec.Struct, tag=True, array_like=True):
    message: str
    bad_input: bool  # a checkpoint or flag the user can fix (gptserve exits 2), not a crash


class StepOutputs(msgspec.Struct, tag=True, array_like=True):
    """One engine step's (or one batch of commands') outputs, the metric calls the step made, and the load after."""

    outputs: list[tuple[str, ChoiceOutput]]
    events: list[MetricEvent]
    stats: EngineStats


class GrammarCompiled(msgspec.Struct, tag=True, array_like=True):
    ticket: int
    error: str | None = None  # why the grammar cannot be used
    param: str | None = None  # the request field at fault; None with an error: the compiler itself failed


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """Something the engine needs is gone (a tensor-parallel rank, the engine loop): every request gets 503."""

    reason: str


FromCore = Ready | LoadFailed | StepOutputs | GrammarCompiled | CoreFailed

encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)
