"""Streaming text: never a split UTF-8 character, never a stop string (or the start of one) let out."""

from __future__ import annotations

import pytest

from models.tokenizer import load_tokenizer
from server.detokenizer import StopStringMatcher, TokenTextDecoder, token_text


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    return load_tokenizer(tiny_gpt2_dir)


def test_multibyte_character_split_across_tokens_is_held_until_complete(tokenizer):
    text = "€ and 日本 and 🙂"
    # One token per byte, so every multi-byte character spans several tokens.
    single_byte_ids = {tokenizer.token_bytes(i): i for i in range(1024) if len(tokenizer.token_bytes(i)) == 1}
    ids = [single_byte_ids[bytes([b])] for b in text.encode()]
    detokenizer = TokenTextDecoder(tokenizer)
    pieces = [detokenizer.feed(token) for token in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[0] == "" and pieces[2] == "€"  # held for two tokens, released whole by the third


def test_end_of_text_is_control_not_text_unless_special_tokens_are_kept(tokenizer):
    ids = [*tokenizer.encode("Hi"), tokenizer.eos_token_id, *tokenizer.encode("!")]
    for skip, text in ((True, "Hi!"), (False, "Hi<|endoftext|>!")):
        detokenizer = TokenTextDecoder(tokenizer, skip_special_tokens=skip)
        assert "".join(detokenizer.feed(t) for t in ids) == text


def test_dangling_partial_character_becomes_replacement_only_at_the_end(tokenizer):
    detokenizer = TokenTextDecoder(tokenizer)
    first_byte_of_euro = next(i for i in range(1024) if tokenizer.token_bytes(i) == b"\xe2")
    assert detokenizer.feed(first_byte_of_euro) == ""
    assert detokenizer.flush() == "\ufffd"


def test_token_text_marks_partial_utf8_as_bytes(tokenizer):
    partial = next(i for i in range(1024) if tokenizer.token_bytes(i) == b"\xe2")
    assert token_text(tokenizer, partial) == "bytes:\\xe2"
    assert token_text(tokenizer, tokenizer.encode(" hello")[0]) == " hello"


def test_possible_stop_prefix_is_held_back_then_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("ill") == "STill"
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_stop_string_across_pieces_truncates_before_it():
    matcher = StopStringMatcher(["\n\n", "END"])
    out = [matcher.feed(piece) for piece in ["one\n", "two E", "N", "D three"]]
    assert "".join(out) == "one\ntwo "
    assert matcher.matched == "END"
    assert matcher.feed("more") == ""


def test_a_kept_stop_string_ends_the_text_even_across_pieces():
    """vLLM's include_stop_str_in_output: the match is let out, nothing after it."""
    matcher = StopStringMatcher(["\n\n", "END"], keep_match=True)
    out = [matcher.feed(piece) for piece in ["one\n", "two E", "N", "D three"]]
    assert "".join(out) == "one\ntwo END"
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.matched == "lo w"


def test_held_back_tail_is_flushed_when_the_sequence_ends():
    matcher = StopStringMatcher(["<end>"])
    assert matcher.feed("text <en") == "text "
    assert matcher.flush() == "<en"
