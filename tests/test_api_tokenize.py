"""/tokenize, /detokenize, /tokenizer_info and /version (vLLM's, at the root): /tokenize counts exactly what the
completions and chat endpoints bill as ``usage.prompt_tokens``, for GPT-2 (plain template) and GPT-OSS (harmony).
tests/test_lm_eval_client.py has a client that leans on them."""

from __future__ import annotations

import httpx
import pytest

from models.tokenizer import byte_level_bytes, load_tokenizer
from server.chat.template import DEFAULT_CHAT_TEMPLATE
from tests.server_process import ServerProcess

KEY = "tokenize-key"
PROMPT = "Hello world, <|endoftext|> héllo ✓"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "name": "ada", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "How are <|end|> you?"},
]


@pytest.fixture(scope="module")
def tiny_gpt_oss_dir(tmp_path_factory):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    return write_tiny_gpt_oss(tmp_path_factory.mktemp("tiny") / "gpt-oss")


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tiny_gpt_oss_dir):
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--model", f"oss={tiny_gpt_oss_dir}", "--api-key", KEY]
    with ServerProcess(args, startup_timeout=300) as running:  # two models, on a busy CI machine too
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_tokenize_prompt_counts_what_completions_bills(http, tiny_gpt2_dir):
    tokenized = http.post("/tokenize", json={"model": "tiny", "prompt": PROMPT}).json()
    completion = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1}).json()
    assert tokenized["tokens"] == load_tokenizer(tiny_gpt2_dir).encode(PROMPT)
    assert tokenized["count"] == len(tokenized["tokens"]) == completion["usage"]["prompt_tokens"]
    assert tokenized["max_model_len"] == http.get("/v1/models/tiny").json()["max_model_len"]


@pytest.mark.parametrize("model", ["tiny", "oss"])
def test_tokenize_messages_counts_what_chat_completions_bills(http, model):
    request = {"model": model, "messages": MESSAGES, "reasoning_effort": "low"}
    tokenized = http.post("/tokenize", json=request | {"add_generation_prompt": True}).json()
    chat = http.post("/v1/chat/completions", json=request | {"max_completion_tokens": 1}).json()
    assert tokenized["count"] == chat["usage"]["prompt_tokens"]
    other_effort = http.post("/tokenize", json=request | {"reasoning_effort": "high"}).json()
    assert (other_effort["tokens"] != tokenized["tokens"]) == (model == "oss")  # harmony states the effort


def test_token_strs_are_the_byte_level_pieces_of_the_prompt(http):
    tokenized = http.post("/tokenize", json={"model": "tiny", "prompt": PROMPT, "return_token_strs": True}).json()
    assert tokenized["token_strs"][:2] == ["Hello", "Ġworld"]
    assert b"".join(byte_level_bytes(piece) for piece in tokenized["token_strs"]) == PROMPT.encode()
    assert http.post("/tokenize", json={"model": "tiny", "prompt": "x"}).json()["token_strs"] is None


def test_detokenize_gives_back_the_text(http):
    for model in ("tiny", "oss"):
        tokens = http.post("/tokenize", json={"model": model, "prompt": PROMPT}).json()["tokens"]
        assert http.post("/detokenize", json={"model": model, "tokens": tokens}).json() == {"prompt": PROMPT}
    assert http.post("/detokenize", json={"model": "tiny", "tokens": []}).json() == {"prompt": ""}


def test_bad_tokenizer_requests_are_400_naming_the_field(http):
    assert_error(http.post("/detokenize", json={"model": "tiny", "tokens": [15496, 50257]}), 400, "tokens")
    assert_error(http.post("/detokenize", json={"model": "tiny", "tokens": [-1]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={"model": "tiny"}), 400, "prompt")
    assert_error(http.post("/tokenize", json={"model": "tiny", "prompt": "x", "messages": MESSAGES}), 400, "prompt")
    assert_error(http.post("/tokenize", json={"model": "tiny", "prompt": "x", "reasoning_effort": "low"}), 400,
                 "reasoning_effort")
    assert_error(http.post("/tokenize", json={"model": "tiny", "messages": MESSAGES, "continue_final_message": True}),
                 400, "continue_final_message")
    assert_error(http.post("/tokenize", json={"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}), 400,
                 "messages")
    assert_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(http.post("/detokenize", json={"model": "nope", "tokens": [1]}), 404, "model")
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("model", ["tiny", "oss"])
@pytest.mark.parametrize("ending", [{"add_generation_prompt": False},
                                    {"add_generation_prompt": False, "continue_final_message": True}])
def test_tokenize_messages_ends_the_prompt_as_chat_completions_does(http, model, ending):
    """The same prompt endings as the chat endpoint: /tokenize counts what it bills."""
    request = {"model": model, "messages": MESSAGES[:3], **ending}
    tokenized = http.post("/tokenize", json=request).json()
    chat = http.post("/v1/chat/completions", json=request | {"max_completion_tokens": 1}).json()
    assert tokenized["count"] == chat["usage"]["prompt_tokens"]
    with_prompt = http.post("/tokenize", json={"model": model, "messages": MESSAGES[:3]}).json()
    assert tokenized["tokens"] != with_prompt["tokens"]


@pytest.mark.parametrize(("field", "value"), [("continue_final_message", 0), ("add_generation_prompt", 1)])
def test_a_number_is_not_taken_for_the_one_boolean_a_flag_allows(http, field, value):
    """Found by the fuzzer: pydantic's Literal[False] took 0, though the schema says a boolean."""
    body = {"model": "tiny", "messages": MESSAGES, field: value}
    assert_error(http.post("/tokenize", json=body), 400, field)


def test_tokenizer_endpoints_need_the_key_and_version_does_not(server, http):
    calls = (("/tokenize", {"model": "tiny", "prompt": "x"}), ("/detokenize", {"model": "tiny", "tokens": [1]}))
    for path, body in calls:
        assert httpx.post(server.base_url + path, json=body).status_code == 401
        assert http.post(path, json=body).status_code == 200
    assert httpx.get(server.base_url + "/tokenizer_info", params={"model": "tiny"}).status_code == 401
    version = httpx.get(server.base_url + "/version")
    assert version.status_code == 200
    assert version.json()["version"] == http.get("/openapi.json").json()["info"]["version"] != ""


def test_tokenize_with_tools_counts_what_chat_completions_bills(http):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    request = {"model": "oss", "messages": MESSAGES, "tools": tools}
    tokenized = http.post("/tokenize", json=request).json()
    chat = http.post("/v1/chat/completions", json=request | {"max_completion_tokens": 1}).json()
    without_tools = http.post("/tokenize", json={"model": "oss", "messages": MESSAGES}).json()
    assert tokenized["count"] == chat["usage"]["prompt_tokens"] > without_tools["count"]
    none_chosen = http.post("/tokenize", json=request | {"tool_choice": "none"}).json()
    assert none_chosen["tokens"] == without_tools["tokens"]  # "none" leaves the tools out of the prompt


def test_tokenizer_info_is_the_checkpoints_config_as_this_server_holds_it(http, tiny_gpt2_dir, tiny_gpt_oss_dir):
    """Special tokens as text that /tokenize makes one token of; the length and chat template the server uses."""
    gpt2 = http.get("/tokenizer_info", params={"model": "tiny"}).json()
    assert gpt2 == {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,  # passed through
                    "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": None, "model_max_length": http.get("/v1/models/tiny").json()["max_model_len"],
                    "chat_template": DEFAULT_CHAT_TEMPLATE}
    oss = http.get("/tokenizer_info", params={"model": "oss"}).json()
    assert (oss["tokenizer_class"], oss["eos_token"], oss["pad_token"]) == (
        "PreTrainedTokenizerFast", "<|return|>", "<|endoftext|>")
    assert oss["model_max_length"] == http.get("/v1/models/oss").json()["max_model_len"]
    assert oss["chat_template"] is None  # harmony renders its prompts, and this checkpoint has no template
    for model, info in (("tiny", gpt2), ("oss", oss)):
        for field in ("eos_token", "bos_token", "pad_token"):
            if info[field] is not None:
                tokens = http.post("/tokenize", json={"model": model, "prompt": info[field]}).json()["tokens"]
                assert len(tokens) == 1, (model, field)


def test_a_server_of_several_models_needs_the_model_named(http):
    """vLLM's tokenizer endpoints take no model (it serves one); here one served model is taken, several are not."""
    assert_error(http.post("/tokenize", json={"prompt": "x"}), 400, "model")
    assert_error(http.post("/detokenize", json={"tokens": [1]}), 400, "model")
    assert_error(http.get("/tokenizer_info"), 400, "model")
    assert_error(http.get("/tokenizer_info", params={"model": "nope"}), 404, "model")
    assert_error(http.post("/tokenize", json={"messages": MESSAGES}), 400, "model")


def test_template_extras_reach_only_what_each_model_renders_with(http):
    """vLLM's chat_template_kwargs, documents and chat_template: GPT-2's default template ignores variables it
    does not use; GPT-OSS's harmony prompt takes only reasoning_effort and current_date; this server takes no
    request templates (it was not started with --trust-request-chat-template)."""
    def tokens(model: str, **extra) -> list[int]:
        response = http.post("/tokenize", json={"model": model, "messages": MESSAGES} | extra)
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert tokens("tiny", chat_template_kwargs={"enable_thinking": True}) == tokens("tiny")
    assert tokens("oss", chat_template_kwargs={"reasoning_effort": "high"}) == tokens("oss", reasoning_effort="high")
    assert tokens("oss", chat_template_kwargs={"reasoning_effort": "low"}, reasoning_effort="low") \
        == tokens("oss", reasoning_effort="low")
    dated = http.post("/detokenize", json={"model": "oss", "tokens": tokens(
        "oss", chat_template_kwargs={"current_date": "1999-12-31"})}).json()["prompt"]
    assert "Current date: 1999-12-31" in dated
    for model, extra, param in [
            ("oss", {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
            ("oss", {"chat_template_kwargs": {"reasoning_effort": "max"}}, "chat_template_kwargs"),
            ("oss", {"chat_template_kwargs": {"current_date": 1999}}, "chat_template_kwargs"),
            ("oss", {"chat_template_kwargs": {"reasoning_effort": "high"}, "reasoning_effort": "low"},
             "chat_template_kwargs"),
            ("tiny", {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
            ("tiny", {"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
            ("tiny", {"documents": [{"text": "x"}]}, "documents"),
            ("oss", {"documents": [{"text": "x"}]}, "documents"),
            ("tiny", {"chat_template": "{{ messages[0].content }}"}, "chat_template"),
            ("oss", {"chat_template": "{{ messages[0].content }}"}, "chat_template")]:
        assert_error(http.post("/tokenize", json={"model": model, "messages": MESSAGES} | extra), 400, param)
        assert_error(http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES,
                                                             "max_tokens": 1} | extra), 400, param)
