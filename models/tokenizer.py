"""Tokenizers built from a checkpoint's own files (HF byte-level BPE) and run by tiktoken.

HF's BPE merges the adjacent pair that comes first in its merges list; tiktoken merges the adjacent pair whose
joined bytes are the lowest-ranked token (rank = id). Both take the leftmost such pair on a tie. The loader
proves the two make the same merge at every step, for every input, from three properties of the files:

1. every byte is a token;
2. every token T of two or more bytes is built by BPE over lower ranks alone (``byte_pair_split``), ending
   in two tokens (l, r), and the merges list has the merge (l, r);
3. every merge (a, b) joins two tokens into a token, and the rank of a+b never decreases down the list.

Why that suffices: if adjacent parts c, d of a tiktoken state join into a token T, the merges made inside
their span were, in order, the ones BPE over T's bytes alone makes, so (c, d) is T's split (l, r), a listed
merge by (2). From the same state, the lowest-ranked joinable pair (a, b) is then listed; any listed pair
that joins into a higher-ranked token comes later in the list by (3), and listed pairs join only into tokens
(3), so HF picks (a, b) too, at the same leftmost place. Files with one merge per token in rank order (GPT-2's
merges.txt) and files listing every two-token split of each token in rank order (transformers'
TikTokenConverter, which writes the hub's tiktoken-derived tokenizer.json files, GPT-OSS's among them) both
pass. Refused: a token that BPE over lower ranks cannot build (its rank is not a merge order), a token whose
lower-rank build is not a listed merge (HF would never build it where tiktoken does), merges out of rank order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AnyStr

import tiktoken

ENDOFTEXT = "<|endoftext|>"

# The pattern HF's ByteLevel pre-tokenizer applies when use_regex is true: GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def special_token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken object holding it."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TokenizerError(ValueError):
    """Tokenizer files that tiktoken cannot reproduce exactly."""


class Tokenizer:
    """Text <-> token ids for one checkpoint."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        self.vocab_size: int = encoding.n_vocab
        self.special_tokens: dict[str, int] = {
            text: encoding.encode_single_token(text) for text in encoding.special_tokens_set
        }
        if ENDOFTEXT not in self.special_tokens:
            raise TokenizerError(f"the vocabulary has no {ENDOFTEXT} token")
        self.eos_token_id: int = self.special_tokens[ENDOFTEXT]

    def encode(self, text: str) -> list[int]:
        """Special-token strings in the text become their ids, as transformers does."""
        return self._encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._encoding.decode_bytes(ids)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either makes a folder a tokenizer's (load_tokenizer reads it)


def load_tokenizer(model_dir: Path, *, checked: bool = True) -> Tokenizer:
    """The tokenizer of a checkpoint directory: tokenizer.json, else GPT-2's vocab.json + merges.txt.

    ``checked=False`` skips proving that tiktoken merges as HF does (~3/4 of o200k's load time): for a process
    whose files another one checks, as an engine core's front end does."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        with (model_dir / "tokenizer.json").open(encoding="utf-8") as f:
            spec = json.load(f)
        vocab, merges, special_tokens = _read_tokenizer_json(spec)
        pattern = _pattern(spec.get("pre_tokenizer"))
    elif (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        with (model_dir / "vocab.json").open(encoding="utf-8") as f:
            vocab = json.load(f)
        merges = _read_merges_txt(model_dir / "merges.txt")
        special_tokens = {ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {}
        pattern = GPT2_PATTERN
    else:
        raise FileNotFoundError(f"no tokenizer in {model_dir}: looked for tokenizer.json, or vocab.json + merges.txt")
    text_ranks = _text_ranks(vocab, special_tokens)
    if checked:
        _check_merges(text_ranks, merges)
    ranks = {byte_level_bytes(text): token_id for text, token_id in text_ranks.items()}
    if checked:
        _check_ids(ranks, special_tokens)
    encoding = tiktoken.Encoding(
        model_dir.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
    )
    # tiktoken copied the ranks into its Rust tables and keeps the dict only to pickle itself: 58 MiB on o200k
    # in every process holding a tokenizer. Without it, pickling one fails rather than copying it.
    del encoding._mergeable_ranks
    return Tokenizer(encoding)


def byte_pair_split(token: AnyStr, ranks: dict[AnyStr, int]) -> list[AnyStr]:
    """The parts BPE builds from the token's bytes (or byte-level chars) using only tokens of lower rank."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(left + right, limit) for left, right in zip(parts, parts[1:])]
    while pair_ranks and (best := min(pair_ranks)) < limit:
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], limit)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], limit)
    return parts


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [""] * 256
    for byte in printable:
        chars[byte] = chr(byte)
    unprintable = [byte for byte in range(256) if byte not in printable]
    for offset, byte in enumerate(unprintable):
        chars[byte] = chr(256 + offset)
    return chars


BYTE_CHARS: list[str] = _byte_chars()
# str.translate tables between byte-level text and latin-1 text (one char per byte); chars below U+0100 that
# stand for no byte map to U+FFFF so that encoding to latin-1 rejects them.
_TO_LATIN1 = {ord(char): chr(byte) for byte, char in enumerate(BYTE_CHARS)} | {
    code: "\uffff" for code in range(256) if chr(code) not in BYTE_CHARS
}
_FROM_LATIN1 = {byte: char for byte, char in enumerate(BYTE_CHARS)}


def byte_level_text(data: bytes) -> str:
    return data.decode("latin-1").translate(_FROM_LATIN1)


def byte_level_bytes(text: str) -> bytes:
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise TokenizerError(f"token {text!r} is not byte-level BPE text: some chars stand for no byte") from None


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_merge_pair(line) for line in lines if line and not line.startswith("#version")]


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    """One merge as written in merges.txt ("a b") or in newer tokenizer.json files (["a", "b"])."""
    pair = merge.split(" ") if isinstance(merge, str) else merge
    if len(pair) != 2:
        raise TokenizerError(f"malformed merge {merge!r}")
    return pair[0], pair[1]


def _read_tokenizer_json(spec: dict) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """vocab, merges and special tokens of a tokenizer.json, or a TokenizerError for what tiktoken can't do."""
    model = spec.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise TokenizerError(f"tokenizer.json: model type {model.get('type')!r} is not BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError("tokenizer.json: byte_fallback / subword prefix / word suffix are not byte-level BPE")
    if spec.get("normalizer") is not None:
        raise TokenizerError(f"tokenizer.json: normalizer {spec['normalizer'].get('type')!r} is not supported")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerError("tokenizer.json: decoder must be ByteLevel")
    # The post-processor only adds tokens around a whole sequence; encode() returns the text's own tokens.
    special_tokens = {}
    for added in spec.get("added_tokens", []):
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise TokenizerError(f"tokenizer.json: added token {added['content']!r} strips or matches words")
        special_tokens[added["content"]] = added["id"]
    _check_special_prefixes(special_tokens)
    merges = [_merge_pair(merge) for merge in model["merges"]]
    return model["vocab"], merges, special_tokens


def _pattern(pre_tokenizer: dict | None) -> str:
    """The split regex of ByteLevel (GPT-2's) or of Sequence[Split(regex), ByteLevel(use_regex=false)]."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    kinds = [(step or {}).get("type") for step in steps]
    byte_level = steps[-1] if kinds[-1:] == ["ByteLevel"] else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise TokenizerError(f"tokenizer.json: pre_tokenizer {kinds} must end in ByteLevel without add_prefix_space")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex is not None and split.get("behavior") == "Isolated" and not split.get("invert"):
            return regex
    raise TokenizerError(f"tokenizer.json: pre_tokenizer {kinds} is not a single regex split tiktoken can run")


def _text_ranks(vocab: dict[str, int], special_tokens: dict[str, int]) -> dict[str, int]:
    """The BPE tokens, as byte-level text (one char per byte, so joining texts joins bytes), and their ids."""
    for text, token_id in special_tokens.items():
        if vocab.get(text, token_id) != token_id:
            raise TokenizerError(f"special token {text!r} has id {token_id} but the vocabulary says {vocab[text]}")
    return {text: token_id for text, token_id in vocab.items() if text not in special_tokens}


def _check_merges(ranks: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Properties 1-3 of the module docstring, on byte-level text; a TokenizerError names the first failure."""
    missing = [byte for byte, char in enumerate(BYTE_CHARS) if char not in ranks]
    if missing:
        raise TokenizerError(f"the vocabulary lacks single-byte tokens for bytes {missing[:8]}")
    listed: set[tuple[str, str]] = set()
    previous = -1
    for left, right in merges:
        rank = ranks.get(left + right)
        if rank is None or left not in ranks or right not in ranks:
            raise TokenizerError(f"merge {left!r} {right!r}: does not join two tokens into a token")
        if rank < previous:
            raise TokenizerError(f"merge {left!r} {right!r}: its token's id {rank} is out of merge order "
                                 f"(an earlier merge makes id {previous})")
        previous = rank
        listed.add((left, right))
    for token in ranks:
        if len(token) > 1 and tuple(parts := byte_pair_split(token, ranks)) not in listed:
            if len(parts) != 2:
                raise TokenizerError(f"token {token!r}: BPE over lower ids cannot build it (it stops at "
                                     f"{len(parts)} parts), so the token ids are not a BPE merge order")
            raise TokenizerError(f"token {token!r}: BPE over lower ids builds it from {parts[0]!r} {parts[1]!r}, "
                                 "and no merge joins those two")


def _check_ids(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    ids = sorted([*ranks.values(), *special_tokens.values()])
    if ids != list(range(len(ids))):
        raise TokenizerError(f"token ids are not 0..{len(ids) - 1}, each used once")


def _check_special_prefixes(special_tokens: dict[str, int]) -> None:
    """transformers matches the longest special token, tiktoken the first listed: they differ on prefixes."""
    texts = sorted(special_tokens)
    for shorter, longer in zip(texts, texts[1:]):
        if longer.startswith(shorter):
            raise TokenizerError(f"special token {shorter!r} is a prefix of {longer!r}")
