"""POST /v1/chat/completions through the OpenAI SDK: GPT-2 via the plain template, GPT-OSS via harmony."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from models.generation import greedy_generate
from models.loader import load_model
from models.tokenizer import load_tokenizer
from server.chat import ChatMessage, HarmonyChatFormat, TemplateChatFormat
from tests.server_process import ServerProcess

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there!"}]}]
AS_CHAT_MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there!")]


@pytest.fixture(scope="module")
def tiny_gpt_oss_dir(tmp_path_factory):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    return write_tiny_gpt_oss(tmp_path_factory.mktemp("tiny") / "gpt-oss")


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tiny_gpt_oss_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--model", f"oss={tiny_gpt_oss_dir}",
                        "--trust-request-chat-template"]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def oracle_reply(directory, chat_format_of, max_tokens: int, reasoning_effort: str | None = None,
                 messages: list[ChatMessage] = AS_CHAT_MESSAGES, **ending: bool):
    """Greedy tokens from the offline generator, parsed by the same chat format the server uses (``ending``:
    add_generation_prompt and continue_final_message, as the request gives them)."""
    loaded = load_model(directory, dtype="float32", device="cpu")
    chat_format = chat_format_of(loaded.tokenizer)
    prompt = chat_format.render(messages, reasoning_effort=reasoning_effort, **ending)
    tokens = greedy_generate(loaded.model, [prompt], max_tokens, chat_format.stop_token_ids,
                             vocab_size=loaded.tokenizer.vocab_size)[0]
    parser = chat_format.parser(messages[-1] if ending.get("continue_final_message") else None)
    reasoning = content = ""
    for delta in [*(parser.feed(t) for t in tokens), parser.finish()]:
        reasoning, content = reasoning + delta.reasoning, content + delta.content
    return prompt, tokens, reasoning, content


def test_gpt2_chat_uses_the_template_and_matches_greedy(client, tiny_gpt2_dir):
    prompt, tokens, _, content = oracle_reply(tiny_gpt2_dir, TemplateChatFormat, 10)
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    message = result.choices[0].message
    assert result.object == "chat.completion"
    assert message.role == "assistant"
    assert message.content == content
    assert getattr(message, "reasoning_content", None) is None
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(tokens)


def test_gpt_oss_chat_splits_reasoning_from_content_as_harmony_parses_it(client, tiny_gpt_oss_dir):
    prompt, tokens, reasoning, content = oracle_reply(tiny_gpt_oss_dir, HarmonyChatFormat, 24, "low")
    result = client.chat.completions.create(model="oss", messages=MESSAGES, max_completion_tokens=24,
                                            temperature=0, reasoning_effort="low")
    message = result.choices[0].message
    assert message.content == content
    assert (getattr(message, "reasoning_content", None) or "") == reasoning
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(tokens)


def test_gpt_oss_stream_carries_the_same_reasoning_and_content(client):
    kwargs = {"model": "oss", "messages": MESSAGES, "max_completion_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = content = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    assert content == whole.content
    assert reasoning == (getattr(whole, "reasoning_content", None) or "")


def test_truncate_prompt_tokens_cuts_the_rendered_chat_prompt(client):
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                            extra_body={"truncate_prompt_tokens": 5})
    assert result.usage.prompt_tokens == 5


def test_chat_logprobs_in_the_chat_format(client, gpt2_tokenizer):
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2)
    entries = result.choices[0].logprobs.content
    assert len(entries) == result.usage.completion_tokens
    for entry in entries:
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token.startswith("bytes:")
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    named = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2,
                                           extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs.content
    for entry, plain in zip(named, entries, strict=True):  # vLLM's return_tokens_as_token_ids: the same tokens
        assert entry.token.startswith("token_id:") and entry.bytes == plain.bytes and entry.logprob == plain.logprob
        assert gpt2_tokenizer.token_bytes(int(entry.token.removeprefix("token_id:"))) == bytes(entry.bytes)
        assert [top.token.startswith("token_id:") for top in entry.top_logprobs] == [True, True]


def test_n_choices_and_stop_strings_in_chat(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, n=2,
                                            stop=stop)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.message.content == text[: text.index(stop)] for c in result.choices)
    assert all(c.finish_reason == "stop" for c in result.choices)
    kept = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop=stop,
                                          extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == text[: text.index(stop) + len(stop)]


PREFILLED = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]


@pytest.mark.parametrize(("model", "chat_format_of"), [("tiny", TemplateChatFormat), ("oss", HarmonyChatFormat)])
@pytest.mark.parametrize("ending", [{"add_generation_prompt": False},
                                    {"add_generation_prompt": False, "continue_final_message": True}])
def test_prompt_endings_equal_the_offline_greedy_reply(client, tiny_gpt2_dir, tiny_gpt_oss_dir, model, chat_format_of,
                                                        ending):
    """vLLM's add_generation_prompt and continue_final_message: the prompt ends with the last message, or inside
    it, and the reply is what follows (a continued answer comes back as content without its prefill)."""
    directory = tiny_gpt2_dir if model == "tiny" else tiny_gpt_oss_dir
    messages = [ChatMessage(m["role"], m["content"]) for m in PREFILLED]
    prompt, tokens, reasoning, content = oracle_reply(directory, chat_format_of, 12, "low", messages, **ending)
    result = client.chat.completions.create(model=model, messages=PREFILLED, max_tokens=12, temperature=0,
                                            reasoning_effort="low", extra_body=ending)
    message = result.choices[0].message
    assert (message.content, getattr(message, "reasoning", None) or "") == (content, reasoning)
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == len(tokens)


def test_continued_reasoning_comes_back_as_reasoning(client, tiny_gpt_oss_dir):
    """A final message with only reasoning is continued on the analysis channel: its continuation is reasoning."""
    prefilled = [PREFILLED[0], {"role": "assistant", "content": "", "reasoning": "Count up from"}]
    messages = [ChatMessage("user", PREFILLED[0]["content"]), ChatMessage("assistant", "", reasoning="Count up from")]
    ending = {"add_generation_prompt": False, "continue_final_message": True}
    _, _, reasoning, content = oracle_reply(tiny_gpt_oss_dir, HarmonyChatFormat, 12, "low", messages, **ending)
    assert reasoning  # the oracle's parser starts in the open analysis body
    result = client.chat.completions.create(model="oss", messages=prefilled, max_tokens=12, temperature=0,
                                            reasoning_effort="low", extra_body=ending)
    message = result.choices[0].message
    assert (message.content, message.reasoning) == (content, reasoning)
    assert result.usage.completion_tokens_details.reasoning_tokens == reasoning_token_count(
        tiny_gpt_oss_dir, messages, 12)


def reasoning_token_count(directory, messages: list[ChatMessage], max_tokens: int) -> int:
    """The reasoning tokens of the offline greedy continuation of ``messages``' open final message."""
    ending = {"add_generation_prompt": False, "continue_final_message": True}
    _, tokens, _, _ = oracle_reply(directory, HarmonyChatFormat, max_tokens, "low", messages, **ending)
    parser = HarmonyChatFormat(load_model(directory, dtype="float32", device="cpu").tokenizer).parser(messages[-1])
    return sum(delta.reasoning_tokens for delta in [*(parser.feed(t) for t in tokens), parser.finish()])


def test_prompt_ending_conflicts_are_400s_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as both:
        client.chat.completions.create(model="tiny", messages=PREFILLED, max_tokens=1,
                                       extra_body={"continue_final_message": True})
    assert both.value.body["param"] == "continue_final_message"
    with pytest.raises(openai.BadRequestError) as constrained:
        client.chat.completions.create(model="oss", messages=PREFILLED, max_tokens=1,
                                       response_format={"type": "json_object"},
                                       extra_body={"add_generation_prompt": False})
    assert constrained.value.body["param"] == "add_generation_prompt"
    with pytest.raises(openai.BadRequestError) as user_last:
        client.chat.completions.create(model="oss", messages=PREFILLED[:1], max_tokens=1,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert user_last.value.body["param"] == "messages"


def test_a_priority_needs_the_priority_policy(client):
    """vLLM's rule: under the default fcfs policy, a priority other than 0 is refused, on every generating route."""
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, extra_body={"priority": 1})
    assert chat.value.body["param"] == "priority"
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=1, extra_body={"priority": -1})
    assert completion.value.body["param"] == "priority"
    with pytest.raises(openai.BadRequestError) as response:
        client.responses.create(model="oss", input="Hi", max_output_tokens=1, extra_body={"priority": 2})
    assert response.value.body["param"] == "priority"
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1,
                                          extra_body={"priority": 0}).choices


@pytest.mark.parametrize("model", ["tiny", "oss"])
def test_skip_special_tokens_false_lets_special_tokens_out_as_text(server, client, model):
    """vLLM's skip_special_tokens: generated special tokens (here forced, past the end of text) are left out of the
    text by default and written out by name when false, on chat as on completions."""
    eos = "<|endoftext|>"
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"model": model, "prompt": eos}).json()["tokens"]
    forced = {"allowed_token_ids": tokens, "ignore_eos": True}
    for skip, content in ((True, ""), (False, eos * 3)):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3,
                                              extra_body=forced | {"skip_special_tokens": skip})
        assert chat.choices[0].message.content == content
        assert chat.usage.completion_tokens == 3
        completion = client.completions.create(model=model, prompt="Hi", max_tokens=3,
                                               extra_body=forced | {"skip_special_tokens": skip})
        assert completion.choices[0].text == content


def test_echo_begins_the_reply_with_the_continued_message_streamed_or_not(client):
    """vLLM's echo with continue_final_message: the content is the whole message, prefill and continuation; it
    echoes nothing when the last message is not the assistant's. add_special_tokens and
    spaces_between_special_tokens are accepted and change nothing here."""
    ending = {"add_generation_prompt": False, "continue_final_message": True}
    kwargs = {"model": "tiny", "messages": PREFILLED, "max_tokens": 6, "temperature": 0}
    alone = client.chat.completions.create(**kwargs, extra_body=ending).choices[0].message.content
    echoed = client.chat.completions.create(**kwargs, extra_body=ending | {"echo": True}).choices[0].message.content
    assert echoed == PREFILLED[1]["content"] + alone
    stream = client.chat.completions.create(**kwargs, stream=True, extra_body=ending | {"echo": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == echoed
    noops = {"echo": True, "add_special_tokens": True, "spaces_between_special_tokens": False}
    plain = client.chat.completions.create(**kwargs | {"messages": PREFILLED[:1]}).choices[0].message.content
    assert client.chat.completions.create(**kwargs | {"messages": PREFILLED[:1]},
                                          extra_body=noops).choices[0].message.content == plain


def test_include_reasoning_false_leaves_the_reasoning_out_streamed_or_not(client):
    """vLLM's include_reasoning: the model still reasons (usage counts it); the reply carries only the rest."""
    prefilled = [PREFILLED[0], {"role": "assistant", "content": "", "reasoning": "Count up from"}]
    kwargs = {"model": "oss", "messages": prefilled, "max_tokens": 12, "temperature": 0}
    ending = {"add_generation_prompt": False, "continue_final_message": True}
    shown = client.chat.completions.create(**kwargs, extra_body=ending)
    hidden = client.chat.completions.create(**kwargs, extra_body=ending | {"include_reasoning": False})
    assert shown.choices[0].message.reasoning  # the continuation of an open analysis message is reasoning
    assert "reasoning" not in hidden.choices[0].message.model_dump(exclude_none=True)
    assert hidden.choices[0].message.content == shown.choices[0].message.content
    assert hidden.usage.completion_tokens == shown.usage.completion_tokens
    stream = client.chat.completions.create(**kwargs, stream=True, extra_body=ending | {"include_reasoning": False})
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert not any(getattr(delta, "reasoning", None) or getattr(delta, "reasoning_content", None) for delta in deltas)
    assert "".join(delta.content or "" for delta in deltas) == (shown.choices[0].message.content or "")


def test_return_token_ids_and_stop_reason_in_chat_streamed_or_not(server, client, tiny_gpt_oss_dir):
    """vLLM's return_token_ids (the prompt's ids beside the choices, in the first chunk when streamed) and
    stop_reason; a client's stop token is output (counted, in token_ids) but never parsed as text."""
    prompt, tokens, _, _ = oracle_reply(tiny_gpt_oss_dir, HarmonyChatFormat, 12, "low")
    k = next(i for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])
    _, _, reasoning, content = oracle_reply(tiny_gpt_oss_dir, HarmonyChatFormat, k, "low")
    sampling = {"model": "oss", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "reasoning_effort": "low"}
    extra = {"return_token_ids": True, "stop_token_ids": [tokens[k]]}
    result = client.chat.completions.create(**sampling, extra_body=extra)
    choice = result.choices[0]
    assert result.prompt_token_ids == prompt
    assert choice.token_ids == tokens[: k + 1]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", tokens[k])
    assert (choice.message.content or "", choice.message.reasoning or "") == (content, reasoning)
    assert result.usage.completion_tokens == k + 1
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=60,
                      json=sampling | extra | {"stream": True}) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == prompt
    assert not any("prompt_token_ids" in chunk for chunk in chunks[1:])
    assert [t for chunk in chunks for c in chunk["choices"] for t in c.get("token_ids", [])] == choice.token_ids
    assert chunks[-1]["choices"][0]["stop_reason"] == tokens[k]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).model_dump(exclude_unset=True)
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    assert plain["choices"][0]["stop_reason"] is None


def test_a_request_s_own_template_kwargs_and_documents_render_as_transformers_renders_them(client, tiny_gpt2_dir):
    """On a server started with --trust-request-chat-template: vLLM's chat_template, chat_template_kwargs and
    documents, as transformers' apply_chat_template renders them (printed values encoded as ordinary text)."""
    from transformers import GPT2TokenizerFast

    from tests.test_chat_template import RAG_TEMPLATE

    documents = [{"title": "Tides", "text": "Twice a day."}]
    kwargs = {"enable_thinking": True, "budget": 64}
    messages = [{"role": "user", "content": "Why tides?"}]
    expected = GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir).apply_chat_template(
        messages, chat_template=RAG_TEMPLATE, tokenize=False, add_generation_prompt=True, documents=documents,
        **kwargs)
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={
        "chat_template": RAG_TEMPLATE, "chat_template_kwargs": kwargs, "documents": documents,
        "return_token_ids": True})
    assert result.prompt_token_ids == load_tokenizer(tiny_gpt2_dir).encode_ordinary(expected)
    for template in ("{% for m in messages %}", "{{ messages[0].content }}"):  # a syntax error; no documents
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, extra_body={
                "chat_template": template, "documents": documents})
        assert refused.value.body["param"] == ("chat_template" if "for" in template else "documents")


def test_a_request_s_looping_template_is_stopped_and_the_server_answers_meanwhile(server, client):
    """A request's own template renders off the event loop, within its limits (server.routes.chat_prompt)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_chat_template import LOOP_WRITING_NOTHING

    def render_forever() -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                           extra_body={"chat_template": LOOP_WRITING_NOTHING})
        return refused.value

    with ThreadPoolExecutor(1) as pool:
        looping = pool.submit(render_forever)
        time.sleep(1.0)  # the render has started
        started = time.monotonic()
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 1.0 and not looping.done()
        refused = looping.result(timeout=30)
    assert refused.body["param"] == "chat_template" and "longer than" in refused.body["message"]
