"""Constrained decoding on the engine side: grammars compiled once, a matcher per sequence, one bitmask per batch.

The front end only names the constraint (a ``GrammarSpec`` in SamplingParams); the grammar state lives here, with
the sampler, so it moves with the engine core. xgrammar does the work (chosen by measured mask cost, see
bench/NOTES.md). JSON is compact: no free whitespace, since the o200k vocabulary has hundreds of whitespace tokens
a random-weight model would otherwise run through forever.

A regular expression, an EBNF grammar or a structural tag (vLLM's ``structured_outputs``, its free text) is the
client's own language: its tokens may hold any bytes, control characters included, so it compiles against a
second vocabulary table, built on first use.

A forced tool call among several functions runs in two stages, since special tokens have no bytes in a grammar:
first a grammar over the functions' names as plain text, ended by the first token of the call header (which the
mask allows only where a name is complete); then the rest of the header is forced and the chosen function's
argument grammar applies, ended only by the spec's end tokens (harmony's `<|call|>`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import xgrammar as xgr
from torch import Tensor

from models.tokenizer import Tokenizer
from server.engine.errors import RequestRejected
from server.engine.sampling_params import GRAMMAR_CACHE_SIZE, CallChoice, GrammarSpec

# Any JSON object, bounded so that even a random-weight model closes it: at most 3 members whose values are
# scalars or one level of object/array with at most 3 scalars, strings of at most 8 characters, numbers of at
# most 9+6 digits. Worst case about 420 tokens (one token per character); typical outputs are far shorter.
BOUNDED_JSON_OBJECT = r"""
root ::= "{" (member ("," member){0,2})? "}"
member ::= string ":" value
value ::= scalar | "{" (string ":" scalar ("," string ":" scalar){0,2})? "}" | "[" (scalar ("," scalar){0,2})? "]"
scalar ::= string | number | "true" | "false" | "null"
string ::= "\"" char{0,8} "\""
char ::= [^"\\\x00-\x1f] | "\\" ["\\/bfnrt]
number ::= "-"? ("0" | [1-9] [0-9]{0,8}) ("." [0-9]{1,6})?
"""


@dataclass(slots=True, eq=False)
class CallSelection:
    """The first stage of a forced call among several functions: the name's bytes so far, and what comes next."""

    arguments: dict[str, xgr.CompiledGrammar]  # by name text: each function's argument grammar
    header_rest: list[int]  # forced once the name is complete
    end_token_ids: list[int]  # what may end the arguments
    token_bytes: list[bytes]
    name: bytearray = field(default_factory=bytearray)


@dataclass(slots=True, eq=False)
class GrammarState:
    """One sequence's progress: the forced tokens still to come, then its grammar matcher."""

    matcher: xgr.GrammarMatcher
    vocab_size: int  # the tokenizer's: logits beyond it (a padded embedding) are never allowed
    forced: list[int] = field(default_factory=list)
    selection: CallSelection | None = None  # still choosing which function a forced call calls

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar (or the forced token) does not allow it."""
        if self.forced:
            return self.forced.pop(0) == token
        if not self.matcher.accept_token(token):
            return False
        selection = self.selection
        if selection is not None:
            if self.matcher.is_terminated():  # the header's first token: the name is complete
                compiled = selection.arguments[selection.name.decode()]
                self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=selection.end_token_ids or None)
                self.forced = list(selection.header_rest)
                self.selection = None
            else:
                selection.name += selection.token_bytes[token]
        return True


class GrammarCompiler:
    """Compiled grammars by spec for one tokenizer, least recently used dropped beyond ``capacity``."""

    def __init__(self, tokenizer: Tokenizer, capacity: int = GRAMMAR_CACHE_SIZE) -> None:
        specials = set(tokenizer.special_tokens.values())
        # Tokens with no bytes are never allowed: special tokens (stop tokens are allowed per matcher).
        self._text_bytes = [b"" if i in specials else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        # For JSON, neither is any token holding a control character, which compact JSON has no place for (JSON
        # strings must escape them, and xgrammar's string rule lets them through raw).
        encoded = [b"" if any(byte < 0x20 for byte in token) else token for token in self._text_bytes]
        self.vocab_size = tokenizer.vocab_size
        self._eos_token_id = tokenizer.eos_token_id
        self._token_bytes = encoded
        self._compiler = self._new_compiler(encoded)
        self._text_compiler: xgr.GrammarCompiler | None = None  # for regex and EBNF: every token's bytes
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # the front end checks specs while the engine thread compiles them
        self._text_lock = threading.Lock()

    def cached(self, spec: GrammarSpec) -> bool:
        with self._lock:
            return spec in self._cache

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar (for a forced call: of its names, the arguments' compiled too), or
        RequestRejected naming ``spec.param`` when a schema cannot be served."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        for call in spec.calls:
            self.compile(argument_spec(spec, call))
        what = ("regular expression" if spec.regex is not None else "grammar" if spec.ebnf is not None
                else "structural tag" if spec.structural_tag is not None else "JSON schema")
        try:
            if spec.regex is not None:
                compiled = self._texts().compile_regex(spec.regex)
            elif spec.ebnf is not None:
                compiled = self._texts().compile_grammar(spec.ebnf)
            elif spec.structural_tag is not None:
                compiled = self._texts().compile_structural_tag(spec.structural_tag)
            elif spec.calls:
                compiled = self._compiler.compile_grammar(names_grammar(spec.calls))
            elif spec.json_schema is None:
                compiled = self._compiler.compile_grammar(BOUNDED_JSON_OBJECT)
            else:
                compiled = self._compiler.compile_json_schema(spec.json_schema, any_whitespace=False,
                                                          separators=(",", ":"), strict_mode=True)
        except Exception as exc:  # xgrammar reports a bad schema with several exception types
            raise RequestRejected(f"{spec.param}: cannot compile the {what}: {exc}", spec.param) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return compiled

    def _new_compiler(self, token_bytes: list[bytes]) -> xgr.GrammarCompiler:
        info = xgr.TokenizerInfo(token_bytes, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=[self._eos_token_id])
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def _texts(self) -> xgr.GrammarCompiler:
        with self._text_lock:  # built once, whichever thread compiles the first regex or grammar
            if self._text_compiler is None:
                self._text_compiler = self._new_compiler(self._text_bytes)
            return self._text_compiler

    def new_state(self, spec: GrammarSpec, stop_token_ids: frozenset[int]) -> GrammarState:
        ends = sorted(spec.end_token_ids or stop_token_ids)
        if not spec.calls:
            matcher = xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=ends or None)
            return GrammarState(matcher, self.vocab_size, list(spec.forced_prefix))
        matcher = xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=[spec.call_header[0]])
        arguments = {call.name_text: self.compile(argument_spec(spec, call)) for call in spec.calls}
        selection = CallSelection(arguments, list(spec.call_header[1:]), ends, self._token_bytes)
        return GrammarState(matcher, self.vocab_size, list(spec.forced_prefix), selection)


def argument_spec(spec: GrammarSpec, call: CallChoice) -> GrammarSpec:
    return GrammarSpec(call.json_schema, param=spec.param)


def names_grammar(calls: tuple[CallChoice, ...]) -> str:
    """Exactly one of the names, as plain text (JSON string literals are valid EBNF ones)."""
    return "root ::= " + " | ".join(json.dumps(call.name_text) for call in calls)


_batch_matcher: xgr.BatchGrammarMatcher | None = None
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # byte value -> its 8 bits, low first


def apply_grammars(logits: Tensor, states: list[GrammarState | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar (or forced token) rules out; rows without one are
    left alone, and a batch without any costs one pass over ``states``."""
    live = [(i, state) for i, state in enumerate(states) if state is not None]
    if not live:
        return
    rows = [i for i, _ in live]
    global _batch_matcher
    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
    vocab = live[0][1].vocab_size
    bitmask = torch.zeros(len(rows), -(-vocab // 32), dtype=torch.int32)
    matchers, matcher_rows = [], []
    for k, (_, state) in enumerate(live):
        if state.forced:
            token = state.forced[0]
            bitmask[k, token // 32] = 1 << (token % 32) if token % 32 < 31 else -(1 << 31)
        else:
            matchers.append(state.matcher)
            matcher_rows.append(k)
    if matchers:
        _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, matcher_rows)
    mask_logits(logits, rows, bitmask)


def mask_logits(logits: Tensor, rows: list[int], bitmask: Tensor) -> None:
    """logits[rows[k], j] = -inf wherever bit j of bitmask[k] is 0: one lookup and one masked fill, any device."""
    # little-endian int32 words as bytes, each byte looked up as its 8 bits: bit j of a row is token j
    words = bitmask.to(logits.device).view(torch.uint8).int()
    allowed = torch.nn.functional.embedding(words, _BYTE_BITS.to(logits.device, torch.uint8)).flatten(1).bool()
    missing = logits.shape[1] - allowed.shape[1]  # a padded embedding: its extra ids are never allowed
    if missing > 0:
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), missing)], dim=1)
    refused = ~allowed[:, : logits.shape[1]]
    if len(rows) == logits.shape[0]:  # every row constrained: no gather and scatter back
        logits.masked_fill_(refused, float("-inf"))
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(refused, float("-inf"))
