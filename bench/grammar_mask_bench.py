"""Mask cost per decode step of the grammar engines we could use, at batch 64, on GPT-2's and o200k's vocabularies.

Each row advances through a JSON document by taking a random allowed token every step (as a random-weight model
would), so the matchers sit in many different states. Reported per engine and vocabulary: the one-off tokenizer
setup and grammar compile, and per step the time to fill the [64, V/32] bitmask; applying it to the logits is the
same for all (server.engine.structured_output.mask_logits: the engines' own CPU apply kernels were slower).

    python -m bench.grammar_mask_bench [--batch 64] [--steps 40] [--vocab o200k] [--engine xgrammar]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.testing.tokenizer_files import write_gpt2_tokenizer, write_gpt_oss_tokenizer
from models.tokenizer import Tokenizer, load_tokenizer
from server.engine.structured_output import mask_logits

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age", "tags", "kind"],
    "additionalProperties": False,
}


def tokenizers() -> dict[str, Tokenizer]:
    root = Path(tempfile.mkdtemp())
    write_gpt2_tokenizer(root / "gpt2")
    write_gpt_oss_tokenizer(root / "o200k")
    return {"gpt2": load_tokenizer(root / "gpt2"), "o200k": load_tokenizer(root / "o200k")}


def random_allowed(mask_row: torch.Tensor, vocab: int, rng: random.Random) -> int | None:
    bits = ((mask_row.unsqueeze(1) >> torch.arange(32)) & 1).flatten()[:vocab].nonzero().flatten().tolist()
    return rng.choice(bits) if bits else None


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        encoded = [tok.token_bytes(i) if i < tok._encoding.n_vocab and i not in tok.special_tokens.values() else b""
                   for i in range(vocab)]
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, schema: dict | None):
        if schema is None:
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)



class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.tiktoken
        import llguidance.torch

        self.ll = llguidance
        self.tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(tok._encoding, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=1)

    def compile(self, schema: dict | None):
        return self.ll.LLMatcher.grammar_from_json_schema(schema or {"type": "object"},
                                                          defaults={"whitespace_flexible": False})

    def matcher(self, grammar):
        m = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers, bitmask) -> None:
        self.ll.torch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()



class OutlinesCore:
    """A regex DFA indexed over the whole vocabulary: no generic json_object (unbounded nesting is no regex)."""

    name = "outlines-core"

    def __init__(self, tok: Tokenizer, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        specials = set(tok.special_tokens.values())
        words: dict[bytes, list[int]] = {}
        for i in range(tok._encoding.n_vocab):
            if i not in specials:
                words.setdefault(tok.token_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(tok.eos_token_id, words)
        self.vocab = vocab

    def compile(self, schema: dict | None):
        if schema is None:
            return None
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, matchers, bitmask) -> None:
        row_bytes = bitmask.shape[1] * 4
        for i, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[i].data_ptr(), row_bytes, 4)

    def accept(self, guide, token: int) -> None:
        guide.advance(token)


ENGINES = (XGrammar, LLGuidance, OutlinesCore)


def measure(engine_cls: Callable, tok: Tokenizer, schema: dict | None, batch: int, steps: int) -> dict | None:
    vocab = -(-tok._encoding.n_vocab // 32) * 32
    start = time.perf_counter()
    engine = engine_cls(tok, vocab)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    compiled = engine.compile(schema)
    if compiled is None:
        return None
    compile_s = time.perf_counter() - start
    rng = random.Random(0)
    matchers = [engine.matcher(compiled) for _ in range(batch)]
    bitmask = torch.full((batch, vocab // 32), -1, dtype=torch.int32)
    logits = torch.randn(batch, vocab)
    fill_s = apply_s = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        engine.fill(matchers, bitmask)
        fill_s += time.perf_counter() - start
        start = time.perf_counter()
        mask_logits(logits, list(range(batch)), bitmask)
        apply_s += time.perf_counter() - start
        for row, matcher in enumerate(matchers):
            token = random_allowed(bitmask[row], vocab, rng)
            if token is not None and token != tok.eos_token_id:
                engine.accept(matcher, token)
            else:
                matchers[row] = engine.matcher(compiled)
    return {"setup_s": setup, "compile_s": compile_s,
            "fill_ms": 1e3 * fill_s / steps, "apply_ms": 1e3 * apply_s / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vocab", action="append", choices=["gpt2", "o200k"], help="default: both")
    parser.add_argument("--engine", action="append", choices=[e.name for e in ENGINES], help="default: all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for vocab_name, tok in tokenizers().items():
        if args.vocab and vocab_name not in args.vocab:
            continue
        for engine_cls in ENGINES:
            if args.engine and engine_cls.name not in args.engine:
                continue
            for label, schema in (("json_object", None), ("schema", SCHEMA)):
                result = measure(engine_cls, tok, schema, args.batch, args.steps)
                if result is None:
                    print(f"{vocab_name:6} {engine_cls.name:13} {label:11} unsupported")
                    continue
                print(f"{vocab_name:6} {engine_cls.name:13} {label:11} setup {result['setup_s']:6.2f}s  "
                      f"compile {result['compile_s']:6.2f}s  fill {result['fill_ms']:7.2f} ms/step  "
                      f"apply {result['apply_ms']:6.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
