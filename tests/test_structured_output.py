"""response_format forces output that parses and validates, whatever the model: the tiny checkpoints have random
weights, so every choice here passes only because the grammar allowed nothing else. Both model families, chat
and completions, streamed and not, n > 1; the JSON is compact and the schema's maxLength, minimum/maximum and
enum hold. vLLM's structured_outputs (a regex, a choice, an EBNF grammar, or JSON as above) likewise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest

from models.loader import load_model
from server.chat import ChatMessage, HarmonyChatFormat
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.protocol import ResponseFormat
from server.routes.response_format import answer_prefix, grammar_spec
from tests.server_process import ServerProcess

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe someone."}]
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 440, "n": 3}  # the bounded json_object fits in 440
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')
REGEX = r"[0-9]{3}-[a-z]{2}( [A-Z][a-z]{0,3})?"
CHOICES = ["yes", "no", "maybe so", "two\nlines é"]  # a newline: regexes and grammars may use control characters
GRAMMAR = 'root ::= item ("," item){0,3} "."\nitem ::= "a" | "bc" | [0-9]{1,2}'
GRAMMAR_LANGUAGE = re.compile(r"(a|bc|[0-9]{1,2})(,(a|bc|[0-9]{1,2})){0,3}\.")
ANSWER_TAG = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "content": {
    "type": "json_schema", "json_schema": {"enum": ["yes", "no", 42]}}, "end": "</answer>"}}
WEATHER_STRUCTURES = {"structures": [{"begin": "<f=weather>", "schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]},
    "end": "</f>"}], "triggers": ["<f="]}
# each structured_outputs constraint, and what every text it lets out must satisfy
STRUCTURED = {
    "regex": ({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text) is not None),
    "regex-newline": ({"regex": r"[a-z]{2}\n[0-9]"}, lambda text: re.fullmatch(r"[a-z]{2}\n[0-9]", text) is not None),
    "choice": ({"choice": CHOICES}, lambda text: text in CHOICES),
    "grammar": ({"grammar": GRAMMAR}, lambda text: GRAMMAR_LANGUAGE.fullmatch(text) is not None),
    "json": ({"json": SCHEMA}, lambda text: assert_compact_json(text, SCHEMA) is None),
    "json-text": ({"json": json.dumps(SCHEMA)}, lambda text: assert_compact_json(text, SCHEMA) is None),
    "json_object": ({"json_object": True}, lambda text: assert_compact_json(text, {"type": "object"}) is None),
    "structural_tag": ({"structural_tag": json.dumps(ANSWER_TAG)},
                       lambda text: text in ('<answer>"yes"</answer>', '<answer>"no"</answer>', "<answer>42</answer>")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from models.testing.gpt2_checkpoint import write_tiny_gpt2
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    root = tmp_path_factory.mktemp("tiny")
    return {"gpt2": write_tiny_gpt2(root / "gpt2", n_positions=512),  # room for max_tokens
            "oss": write_tiny_gpt_oss(root / "gpt-oss")}


@pytest.fixture(scope="module")
def http(checkpoints):
    with ServerProcess([arg for name, path in checkpoints.items() for arg in ("--model", f"{name}={path}")]) as server:
        with httpx.Client(base_url=server.v1, timeout=120) as client:
            yield client


def assert_compact_json(text: str, schema: dict) -> None:
    """Parses, validates, and has no whitespace outside its strings."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert not re.search(r"\s", STRING_LITERAL.sub("", text)), text


def streamed_texts(http: httpx.Client, path: str, body: dict) -> list[str]:
    texts = [""] * body["n"]
    with http.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: "):])["choices"]:
                texts[choice["index"]] += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return texts


@pytest.mark.parametrize("model", ["gpt2", "oss"])
def test_chat_json_schema_every_choice_validates(http, model):
    body = {"model": model, "messages": MESSAGES, "response_format": JSON_SCHEMA_FORMAT} | SAMPLED
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        assert not choice["message"].get("reasoning_content")
        assert_compact_json(choice["message"]["content"], SCHEMA)


@pytest.mark.parametrize("model", ["gpt2", "oss"])
def test_chat_json_object_streamed_every_choice_parses(http, model):
    body = {"model": model, "messages": MESSAGES, "response_format": {"type": "json_object"}} | SAMPLED
    for text in streamed_texts(http, "/chat/completions", body):
        assert_compact_json(text, {"type": "object"})


@pytest.mark.parametrize("model", ["gpt2", "oss"])
def test_completions_json_schema_streamed_and_not(http, model):
    body = {"model": model, "prompt": "Once upon a time", "response_format": JSON_SCHEMA_FORMAT} | SAMPLED
    response = http.post("/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert_compact_json(choice["text"], SCHEMA)
    for text in streamed_texts(http, "/completions", body | {"seed": 8}):
        assert_compact_json(text, SCHEMA)


@pytest.mark.parametrize("kind", sorted(STRUCTURED))
@pytest.mark.parametrize("model", ["gpt2", "oss"])
def test_structured_outputs_hold_on_every_choice_of_completions_and_chat(http, model, kind):
    constraint, holds = STRUCTURED[kind]
    for path, request in (("/completions", {"prompt": "Once upon a time"}), ("/chat/completions",
                                                                           {"messages": MESSAGES})):
        body = {"model": model, "structured_outputs": constraint} | request | SAMPLED
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            text = choice.get("text", choice.get("message", {}).get("content"))
            assert choice["finish_reason"] == "stop" and holds(text), (path, text)


def test_structured_outputs_streamed_hold_too(http):
    for kind in ("regex", "choice"):
        constraint, holds = STRUCTURED[kind]
        body = {"model": "oss", "messages": MESSAGES, "structured_outputs": constraint} | SAMPLED
        texts = streamed_texts(http, "/chat/completions", body)
        assert all(holds(text) for text in texts), texts


def test_greedy_choice_is_the_same_json_streamed_or_not(http):
    body = {"model": "oss", "messages": MESSAGES, "response_format": JSON_SCHEMA_FORMAT,
            "temperature": 0, "max_tokens": 440, "n": 1}
    whole = http.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert streamed_texts(http, "/chat/completions", body) == [whole]
    assert_compact_json(whole, SCHEMA)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 2}, "min_tokens"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "([a-"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs"),
    ({"response_format": {"type": "structural_tag", "structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}],
                          "triggers": ["<f="]}}, "response_format"),  # a begin no trigger starts
    ({"response_format": {"type": "structural_tag", "triggers": ["<f="]}}, "response_format"),
    ({"structured_outputs": {"structural_tag": "{not json"}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": '{"triggers": ["<f="]}'}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": '{"format": {"type": "no-such-format"}}'}}, "structured_outputs"),
])
def test_unservable_constraints_are_400_naming_the_field(http, extra, param):
    response = http.post("/chat/completions", json={"model": "gpt2", "messages": MESSAGES} | extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert param in response.json()["error"]["message"]
    ok = http.post("/chat/completions", json={"model": "gpt2", "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_gpt_oss_answer_opens_on_the_final_channel_then_follows_the_grammar(checkpoints):
    loaded = load_model(checkpoints["oss"], dtype="float32", device="cpu")
    chat_format = HarmonyChatFormat(loaded.tokenizer)
    header = answer_prefix(chat_format)
    assert loaded.tokenizer.decode(list(header)) == "<|channel|>final<|message|>"
    engine = LLMEngine(loaded, EngineConfig(kv_cache_tokens=4096, max_num_seqs=4))
    grammar = grammar_spec(ResponseFormat.model_validate(JSON_SCHEMA_FORMAT), header)
    params = SamplingParams(max_tokens=440, temperature=1.0, seed=3, stop_token_ids=chat_format.stop_token_ids,
                            grammar=grammar)
    engine.add_request("r", chat_format.render([ChatMessage("user", "Hi")]), params, n=2)
    outputs: dict[int, list[int]] = {0: [], 1: []}
    while engine.has_work:
        for _, out in engine.step():
            outputs[out.index] += out.new_token_ids
    for tokens in outputs.values():
        assert tuple(tokens[: len(header)]) == header
        assert tokens[-1] in chat_format.stop_token_ids  # the grammar's end: a stop token, output as generated
        assert_compact_json(loaded.tokenizer.decode(tokens[len(header):-1]), SCHEMA)


def test_token_outside_the_grammar_fails_that_choice_not_the_engine(checkpoints):
    loaded = load_model(checkpoints["gpt2"], dtype="float32", device="cpu")
    engine = LLMEngine(loaded, EngineConfig(kv_cache_tokens=1024, max_num_seqs=4))
    real_sampler, space = engine.sampler, loaded.tokenizer.encode(" ")[0]  # JSON must open with "{", not " "
    engine.sampler = lambda logits, seqs: ([space] * len(seqs), [None] * len(seqs))
    engine.add_request("bad", loaded.tokenizer.encode("Hi"), SamplingParams(max_tokens=8, grammar=GrammarSpec()))
    (request_id, out), = engine.step()
    assert (request_id, out.finish_reason) == ("bad", "error") and "grammar" in out.error
    engine.sampler = real_sampler
    engine.add_request("next", loaded.tokenizer.encode("Hi"), SamplingParams(max_tokens=4, temperature=0))
    while engine.has_work:
        engine.step()


def test_structural_tags_accept_what_xgrammar_s_own_legacy_form_accepts(checkpoints):
    """vLLM's structures and triggers become xgrammar's triggered tags; xgrammar's deprecated API for exactly
    that form is the oracle: the same texts pass (free text; a trigger opens a tag, then valid JSON, its end)."""
    import xgrammar as xgr

    from models.tokenizer import load_tokenizer
    from server.engine.structured_output import GrammarCompiler
    from server.routes.response_format import structural_tag

    tokenizer = load_tokenizer(checkpoints["gpt2"])
    tags = ResponseFormat.model_validate({"type": "structural_tag"} | WEATHER_STRUCTURES | {"structures": [
        *WEATHER_STRUCTURES["structures"], {"begin": "<f=pick>", "schema": {"enum": [1, 2]}, "end": "</f>"}]})
    ours = GrammarCompiler(tokenizer).compile(GrammarSpec(None, structural_tag=structural_tag(tags.structures,
                                                                                          tags.triggers)))
    info = xgr.TokenizerInfo([b"" if i in tokenizer.special_tokens.values() else tokenizer.token_bytes(i)
                              for i in range(tokenizer.vocab_size)], xgr.VocabType.RAW,
                             vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_token_id])
    legacy = xgr.GrammarCompiler(info, max_threads=1).compile_structural_tag(
        [xgr.StructuralTagItem(begin=t.begin, schema=json.dumps(t.schema_), end=t.end) for t in tags.structures],
        tags.triggers)

    def accepts(grammar, text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(t) for t in tokenizer.encode_ordinary(text)) \
            and matcher.accept_token(tokenizer.eos_token_id)

    texts = ['hi <f=weather>{"city": "Oslo"}</f> bye', '<f=pick>2</f><f=pick>1</f>', "plain words", "",
             '<f=pick>3</f>', '<f=weather>{"town": "Oslo"}</f>', "a <f=nope>", '<f=pick> 1 </f>',
             '<f=weather>{"city": "Oslo-by-the-sea"}</f>']
    verdicts = [accepts(ours, text) for text in texts]
    assert verdicts == [accepts(legacy, text) for text in texts]
    assert verdicts[:4] == [True] * 4 and not any(verdicts[4:])


def test_structural_tag_response_format_is_served_and_its_tags_hold(http):
    """Free text (a random model rarely writes a trigger, so this checks the path and any tag it did write)."""
    for model in ("gpt2", "oss"):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 30, "n": 2, "seed": 3,
                "response_format": {"type": "structural_tag"} | WEATHER_STRUCTURES}
        response = http.post("/chat/completions", json=body)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            text = choice["message"]["content"] or ""
            for opened in text.split("<f=")[1:]:
                match = re.match(r"weather>(.*?)</f>", opened, re.DOTALL)
                assert match or len(opened) < 40, text  # a tag cut short by max_tokens
                if match:
                    jsonschema.validate(json.loads(match.group(1)), WEATHER_STRUCTURES["structures"][0]["schema"])
