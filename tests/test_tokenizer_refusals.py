"""What the tokenizer loader accepts and refuses, on tiny crafted vocabularies: models/tokenizer.py states
the criterion (rank-order BPE provably reproduces the merges list) and these tests hold it to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
from transformers import PreTrainedTokenizerFast

from models.testing.tokenizer_files import write_gpt2_tokenizer
from models.tokenizer import TokenizerError, byte_level_text, load_tokenizer


def test_load_tokenizer_without_files_raises_file_not_found_naming_them(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_rejects_ids_out_of_merge_order(tmp_path: Path) -> None:
    write_gpt2_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġt"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġt"]  # the first two merges
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match="merge order"):
        load_tokenizer(tmp_path)


def _added_token(token_id: int, text: str) -> dict:
    flags = dict.fromkeys(["single_word", "lstrip", "rstrip", "normalized"], False)
    return {"id": token_id, "content": text, **flags, "special": True}


def _tiny_tokenizer_json(merges: list[tuple[str, str]], tokens: list[str] | None = None) -> dict:
    """Byte tokens at their byte values, then ``tokens`` (default: one per merge, in merge order), then
    <|endoftext|>."""
    vocab = {byte_level_text(bytes([b])): b for b in range(256)}
    for token in tokens if tokens is not None else [left + right for left, right in merges]:
        vocab[token] = len(vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(len(vocab), "<|endoftext|>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "merges": [list(merge) for merge in merges]},
    }


def test_tiny_tokenizer_json_matches_transformers(tmp_path: Path) -> None:
    spec = _tiny_tokenizer_json([("a", "b"), ("ab", "c"), ("Ġ", "ab")])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ["abc ab abcab", "cba<|endoftext|> ab"]:
        assert load_tokenizer(tmp_path).encode(text) == hf.encode(text, add_special_tokens=False)


def test_tiny_vocab_with_every_split_listed_matches_transformers(tmp_path: Path) -> None:
    """TikTokenConverter's layout: aaaa is listed as both a+aaa and aa+aa, each at aaaa's rank."""
    tokens = ["aa", "aaa", "aaaa", "ba", "baa"]
    merges = [("a", "a"), ("a", "aa"), ("aa", "a"), ("a", "aaa"), ("aa", "aa"), ("aaa", "a"), ("b", "a"),
              ("b", "aa"), ("ba", "a")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json(merges, tokens)))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    for n in range(1, 12):
        for text in ["a" * n, "b" + "a" * n, "a" * n + "b" + "a" * n]:
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


# Vocabularies that break one property of models/tokenizer.py's criterion, each with a text on which
# transformers (merge-list order) and tiktoken (rank order) really disagree: (merges, tokens, text, message).
DISAGREEING_VOCABULARIES = {
    # ab+c is no merge: transformers stops at [ab, c], while tiktoken joins them into abc.
    "split_not_listed": ([("a", "b"), ("b", "c"), ("a", "bc")], ["ab", "bc", "abc"], "abcabc", "no merge joins"),
    # abc ranks below both halves: tiktoken builds it from a+bc, which transformers never merges.
    "token_below_its_parts": ([("ab", "c"), ("b", "c"), ("a", "b")], ["abc", "bc", "ab"], "abcabc", "cannot build it"),
    # bc ranks below ab but is merged after it.
    "merges_out_of_rank_order": ([("a", "b"), ("b", "c")], ["bc", "ab"], "abc", "merge order"),
}


@pytest.mark.parametrize("case", DISAGREEING_VOCABULARIES, ids=list(DISAGREEING_VOCABULARIES))
def test_load_tokenizer_refuses_vocabularies_where_rank_order_bpe_differs(tmp_path: Path, case: str) -> None:
    merges, tokens, text, message = DISAGREEING_VOCABULARIES[case]
    spec = _tiny_tokenizer_json(merges, tokens)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ranks = {text.encode("latin-1"): rank for text, rank in spec["model"]["vocab"].items() if rank >= 256}
    ranks |= {bytes([b]): b for b in range(256)}
    by_rank = tiktoken.Encoding("tiny", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={})
    assert by_rank.encode_ordinary(text) != hf.encode(text, add_special_tokens=False)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda spec: spec.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
        (lambda spec: spec.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer"),
        (lambda spec: spec.update(decoder=None), "decoder"),
        (lambda spec: spec["model"].update(byte_fallback=True), "byte_fallback"),
        (lambda spec: spec["model"].update(type="WordPiece"), "not BPE"),
        (lambda spec: spec["added_tokens"][0].update(lstrip=True), "strips"),
        (lambda spec: spec["added_tokens"].append(_added_token(260, "<|endoftext|>x")), "prefix"),
        (lambda spec: spec["model"]["vocab"].update({"zz": 300}), "no merge joins"),
        (lambda spec: spec["model"]["merges"].append(["ab", "a"]), "does not join two tokens into a token"),
        (lambda spec: spec["model"]["vocab"].pop("a"), "single-byte"),
    ],
    ids=["normalizer", "prefix_space", "pre_tokenizer", "decoder", "byte_fallback", "model_type", "lstrip",
         "special_prefix", "token_without_merge", "merge_into_no_token", "missing_byte"],
)
def test_load_tokenizer_rejects_what_tiktoken_cannot_reproduce(tmp_path: Path, mutate, message: str) -> None:
    spec = _tiny_tokenizer_json([("a", "b"), ("ab", "c")])
    mutate(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)
