"""The Responses API past create: background runs (retrieve, resume the stream, cancel), delete, input items,
truncation "auto", and the fields that change nothing, through the OpenAI SDK on a scripted engine.

The scripted engine (tests/test_tool_calls_api) can be held before each token, so a background run is caught
while it is still going; tests/test_responses_served.py does the same against a real model under uvicorn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import json
import threading
import time
from collections.abc import AsyncIterator

import openai
import openai_harmony as oh
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.chat import ChatMessage
from server.config import ServerConfig
from server.engine.admission import Admission
from server.engine.errors import EngineUnavailable, QueueFull
from server.engine.outputs import ChoiceOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.generation_defaults import GenerationDefaults
from server.routes.models import ServedModel
from server.routes.response_background import BackgroundRuns
from server.routes.responses import truncated
from tests.test_chat_harmony import assistant, chat, harmony, tokenizer  # noqa: F401 - fixtures
from tests.test_tool_calls_api import ScriptedEngine, model_tokens

ANSWER = "Hello there!"
ANSWER_TOKEN = 13225  # "Hello" in o200k
TERMINAL = ("completed", "incomplete", "cancelled", "failed")


class HeldEngine(ScriptedEngine):
    """Waits before each token while ``hold`` is set; records the requests closed before their last token.
    Requests are admitted by the engine's own rules, in a KV cache too large to matter."""

    def __init__(self, tokenizer, script: list[int]) -> None:
        super().__init__(tokenizer, script)
        self.hold = threading.Event()
        self.aborted: list[str] = []
        self.started: list[str] = []
        self.full = False  # the queue has no room: generate raises as the engine's client does

    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        Admission(self.max_model_len, block_size=16, num_blocks=2**20, prefix_caching=True,
                  max_num_seqs=256).validate(prompt_len, params, n)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       n: int = 1) -> AsyncIterator[ChoiceOutput]:
        if self.full:
            raise QueueFull("too many requests are waiting; retry later")
        self.started.append(request_id)
        finished = False
        try:
            async for output in super().generate(request_id, prompt_ids, params, n):
                while self.hold.is_set():
                    await asyncio.sleep(0.005)
                if params.logprobs is not None:  # each token at -(its id / 1e6), its alternatives below it
                    output.logprobs = [scripted_logprob(token, params.logprobs) for token in output.new_token_ids]
                yield output
            finished = True
        finally:
            if not finished:
                self.aborted.append(request_id)


def scripted_logprob(token: int, k: int) -> TokenLogprob:
    logprob = -token / 1e6
    return TokenLogprob(token, logprob, [(token + i, logprob - i) for i in range(k)])


@pytest.fixture(scope="module")
def engine(chat, harmony) -> HeldEngine:
    script = model_tokens(harmony, [assistant("Greet back.", "analysis"), assistant(ANSWER, "final")],
                          chat.tokens.return_)
    return HeldEngine(chat.tokenizer, script)


@pytest.fixture(scope="module")
def http(chat, engine) -> TestClient:
    app = create_app(ServerConfig(), {})
    with TestClient(app) as running:
        app.state.models["oss"] = ServedModel("oss", engine, chat, 0, {}, GenerationDefaults(chat.stop_token_ids))
        yield running


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture
def held(engine):
    engine.hold.set()
    yield engine
    engine.hold.clear()


def wait_for(client: openai.OpenAI, response_id: str, statuses: tuple[str, ...], seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while (response := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, f"still {response.status}"
        time.sleep(0.01)
    return response


def test_a_background_response_answers_queued_then_completes_as_a_foreground_one_would(client, held):
    created = client.responses.create(model="oss", input="Hi!", background=True)
    assert created.status == "queued" and created.background is True and created.output == []
    assert wait_for(client, created.id, ("in_progress",)).usage is None
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="oss", input="And?", previous_response_id=created.id)
    assert refused.value.body["param"] == "previous_response_id" and "in_progress" in refused.value.body["message"]
    held.hold.clear()
    done = wait_for(client, created.id, TERMINAL)
    foreground = client.responses.create(model="oss", input="Hi!")
    assert done.status == "completed" and done.output_text == foreground.output_text == ANSWER
    assert [item.type for item in done.output] == [item.type for item in foreground.output]
    assert done.usage.output_tokens == foreground.usage.output_tokens


def test_cancelling_a_background_response_aborts_its_request_and_keeps_it_cancelled(client, held):
    created = client.responses.create(model="oss", input="Hi!", background=True)
    wait_for(client, created.id, ("in_progress",))
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.id == created.id
    assert any(request_id.startswith(created.id) for request_id in held.aborted)
    assert client.responses.retrieve(created.id).status == "cancelled"
    assert client.responses.cancel(created.id).status == "cancelled", "cancelling again changes nothing"
    held.hold.clear()
    follow_up = client.responses.create(model="oss", input="Again?", previous_response_id=created.id)
    assert follow_up.output_text == ANSWER, "a cancelled response is stored and can be continued"


def test_a_finished_background_response_cancels_to_itself_and_a_foreground_one_cannot_be_cancelled(client):
    background = client.responses.create(model="oss", input="Hi!", background=True)
    assert wait_for(client, background.id, TERMINAL).status == "completed"
    assert client.responses.cancel(background.id).status == "completed"
    foreground = client.responses.create(model="oss", input="Hi!")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(foreground.id)
    assert refused.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")


def test_a_background_response_the_queue_has_no_room_for_is_a_429_at_once(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "full", True)
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="oss", input="Hi!", background=True)
    assert refused.value.response.headers["retry-after"] == "1"
    monkeypatch.setattr(engine, "full", False)
    created = client.responses.create(model="oss", input="Hi!", background=True)
    assert wait_for(client, created.id, TERMINAL).status == "completed"


def test_background_needs_store(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="oss", input="Hi!", background=True, store=False)
    assert refused.value.body["param"] == "background"


def test_a_background_stream_resumes_after_any_event_with_the_same_sequence(client):
    with client.responses.create(model="oss", input="Hi!", background=True, stream=True) as stream:
        first = [event for _, event in zip(range(3), stream)]
    response_id = first[0].response.id
    assert first[0].response.status == "queued"
    wait_for(client, response_id, TERMINAL)
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    events = first + rest
    assert [event.sequence_number for event in events] == list(range(len(events)))
    with client.responses.stream(model="oss", input="Hi!") as foreground:
        expected = [event.type for event in foreground]
    assert [event.type for event in events] == expected
    assert events[-1].response.output_text == ANSWER
    replay = list(client.responses.retrieve(response_id, stream=True))
    assert [event.type for event in replay] == expected


def test_only_background_responses_stream_from_get(client):
    foreground = client.responses.create(model="oss", input="Hi!")
    with pytest.raises(openai.BadRequestError) as refused:
        list(client.responses.retrieve(foreground.id, stream=True))
    assert refused.value.body["param"] == "stream"


def test_delete_removes_a_stored_response_and_cancels_a_running_one(client, engine):
    stored = client.responses.create(model="oss", input="Hi!")
    deleted = client.responses.delete(stored.id)
    assert deleted is None  # the SDK returns nothing for a 200
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(stored.id)
    engine.hold.set()
    try:
        running = client.responses.create(model="oss", input="Hi!", background=True)
        wait_for(client, running.id, ("in_progress",))
        client.responses.delete(running.id)
    finally:
        engine.hold.clear()
    assert any(request_id.startswith(running.id) for request_id in engine.aborted)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)


def test_a_foreground_response_in_progress_can_be_retrieved_but_not_cancelled_deleted_or_continued(client, held):
    """As OpenAI's: a stored response is visible while its own request generates it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        before = len(held.started)
        creating = pool.submit(client.responses.create, model="oss", input="Hi!")
        deadline = time.monotonic() + 10
        while len(held.started) == before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response_id = held.started[-1].rpartition("-")[0]
        running = client.responses.retrieve(response_id)
        assert (running.status, running.output, running.usage, running.background) == ("in_progress", [], None, False)
        assert [item.content[0].text for item in client.responses.input_items.list(response_id)] == ["Hi!"]
        for call, kwargs in ((client.responses.cancel, {}), (client.responses.delete, {}),
                             (client.responses.create, {"model": "oss", "input": "And?"})):
            with pytest.raises(openai.BadRequestError):
                call(**kwargs, **({"previous_response_id": response_id} if kwargs else {"response_id": response_id}))
        held.hold.clear()
        done = creating.result(timeout=10)
    assert done.id == response_id and done.output_text == ANSWER
    assert client.responses.retrieve(response_id).status == "completed"


def test_delete_answers_openai_s_deleted_object(client):
    stored = client.responses.create(model="oss", input="Hi!")
    answer = client.with_raw_response.responses.delete(stored.id)
    assert answer.http_response.json() == {"id": stored.id, "object": "response.deleted", "deleted": True}


def test_the_stream_names_each_event_by_its_type_and_sends_no_done(http):
    with http.stream("POST", "/v1/responses", json={"model": "oss", "input": "Hi!", "stream": True}) as answer:
        frames = answer.read().decode().split("\n\n")
    assert frames[-1] == "" and frames[:-1], "every frame ends with a blank line"
    for frame in frames[:-1]:
        event, data = frame.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    assert frames[-2].startswith("event: response.completed\n")


def test_an_error_after_the_stream_began_is_an_error_event_the_sdk_raises(client, engine, monkeypatch):
    async def failing(request_id, prompt_ids, params, n=1):
        yield ChoiceOutput(0, [ANSWER_TOKEN])
        raise EngineUnavailable("the engine stopped")

    monkeypatch.setattr(engine, "generate", failing)
    with pytest.raises(openai.APIError, match="the engine stopped"):
        with client.responses.stream(model="oss", input="Hi!") as stream:
            list(stream)


def test_a_method_not_allowed_names_every_method_of_the_path(http):
    answer = http.request("PUT", "/v1/responses/resp_1")
    assert answer.status_code == 405 and answer.headers["allow"] == "DELETE, GET"
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_input_items_list_the_request_s_own_input_newest_first_and_page_by_id(client):
    items = [{"type": "message", "role": "user", "content": f"question {i}"} for i in range(4)]
    items.insert(2, {"type": "message", "role": "assistant", "content": "an answer", "id": "msg_given"})
    first = client.responses.create(model="oss", input="Earlier.")
    created = client.responses.create(model="oss", input=items, previous_response_id=first.id)
    listed = client.responses.input_items.list(created.id)
    assert [item.role for item in listed.data] == ["user", "user", "assistant", "user", "user"]
    texts = [item.content[0].text for item in listed.data]
    assert texts == ["question 3", "question 2", "an answer", "question 1", "question 0"]
    assert listed.data[2].id == "msg_given" and listed.data[2].content[0].type == "output_text"
    assert listed.data[0].content[0].type == "input_text"
    assert listed.first_id == listed.data[0].id and listed.has_more is False
    paged = [item.id for item in client.responses.input_items.list(created.id, limit=2, order="asc")]
    assert paged == [item.id for item in reversed(listed.data)], "auto-pagination walks every page once"
    assert len(set(paged)) == 5
    [only] = client.responses.input_items.list(first.id).data
    assert only.role == "user" and only.content[0].text == "Earlier."
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(created.id, after="msg_unknown")


def harmony_prompt(harmony: oh.HarmonyEncoding, instructions: str, turns: list[tuple[str, str]]) -> list[int]:
    system = oh.SystemContent.new().with_conversation_start_date(datetime.date.today().isoformat())
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
                oh.Message.from_role_and_content(oh.Role.DEVELOPER,
                                                 oh.DeveloperContent.new().with_instructions(instructions))]
    messages += [oh.Message.from_role_and_content(oh.Role.USER, text) if role == "user"
                 else assistant(text, "final") for role, text in turns]
    return harmony.render_conversation_for_completion(oh.Conversation.from_messages(messages), oh.Role.ASSISTANT)


def test_truncation_auto_drops_the_oldest_items_until_the_prompt_fits(client, engine, harmony, monkeypatch):
    turns = [("user" if i % 2 == 0 else "assistant", f"turn {i}: " + "words " * (10 + i)) for i in range(7)]
    fits = harmony_prompt(harmony, "Be brief.", turns[3:])
    monkeypatch.setattr(engine, "max_model_len", len(fits) + 1)  # one output token: turns[2:] is one too many
    items = [{"type": "message", "role": role, "content": text} for role, text in turns]
    response = client.responses.create(model="oss", input=items, instructions="Be brief.", truncation="auto",
                                       max_output_tokens=None)
    assert engine.prompts[-1] == fits, "the instructions stay; the three oldest turns go"
    assert response.truncation == "auto" and response.usage.input_tokens == len(fits)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="oss", input=items, instructions="Be brief.")
    assert refused.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):  # even the last turn alone is longer than what is left
        client.responses.create(model="oss", input=items, truncation="auto", max_output_tokens=len(fits))


def test_truncation_never_begins_the_conversation_with_a_tool_result():
    messages = [ChatMessage("user", "aaaa"), ChatMessage("assistant", "bbbb"), ChatMessage("tool", "cc"),
                ChatMessage("user", "dd")]
    rendered: list[int] = []

    def render(kept: list[ChatMessage]) -> list[int]:
        rendered.append(len(kept))
        return [0] * sum(len(message.content) for message in kept)

    assert truncated(messages, render, 8) == (messages[1:], [0] * 8)
    assert truncated(messages, render, 7) == (messages[3:], [0] * 2), "not from the tool result, 'cc'"
    assert truncated(messages, render, 1) == (messages[3:], [0] * 2), "nothing fits: the shortest, refused later"
    assert truncated(messages, render, 100)[0] == messages


NO_OP_FIELDS = {"service_tier": "auto", "prompt_cache_key": "conversation-7", "safety_identifier": "user-7",
                "include": ["reasoning.encrypted_content", "web_search_call.action.sources"], "max_tool_calls": 3,
                "prompt_cache_retention": "in_memory", "user": "someone", "metadata": {"k": "v"}}


def test_fields_that_change_nothing_are_accepted_and_echoed(client):
    plain = client.responses.create(model="oss", input="Hi!")
    response = client.responses.create(model="oss", input="Hi!", **NO_OP_FIELDS)
    assert response.output_text == plain.output_text
    assert (response.prompt_cache_key, response.safety_identifier, response.max_tool_calls) == (
        "conversation-7", "user-7", 3)
    assert response.service_tier == "default" and response.user == "someone"
    with client.responses.stream(model="oss", input="Hi!", stream_options={"include_obfuscation": False}) as stream:
        assert stream.get_final_response().output_text == ANSWER


def test_logprobs_cover_the_answer_s_tokens_only_streamed_or_not(client, chat):
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    response = client.responses.create(model="oss", input="Hi!", **asked)
    [part] = response.output[-1].content
    assert response.top_logprobs == 2 and part.text == ANSWER
    assert [entry.token for entry in part.logprobs] == [chat.tokenizer.decode([t]) for t in
                                                       chat.tokenizer.encode_ordinary(ANSWER)], \
        "neither the reasoning's tokens nor the headers' nor <|return|>"
    assert b"".join(bytes(entry.bytes) for entry in part.logprobs) == ANSWER.encode()
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
               for entry in part.logprobs)
    with client.responses.stream(model="oss", input="Hi!", **asked) as stream:
        events = list(stream)
    streamed = [entry.model_dump() for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert streamed == [entry.model_dump() for entry in done.logprobs] == [entry.model_dump() for entry in
                                                                             part.logprobs]
    plain = client.responses.create(model="oss", input="Hi!")
    assert plain.output[-1].content[0].logprobs is None and plain.top_logprobs is None


@pytest.mark.parametrize("field", [{"top_logprobs": 21}, {"prompt": {"id": "pmpt_1"}}])
def test_fields_that_are_out_of_bounds_or_not_served_are_refused_by_name(client, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="oss", input="Hi!", **field)
    assert refused.value.body["param"].split(".")[0] == next(iter(field))


class CountedRun:
    """A background run that writes ``deltas`` delta events and completes (the Run protocol, no engine)."""

    def __init__(self, response_id: str, deltas: int) -> None:
        self.id, self.deltas = response_id, deltas
        self.status = "queued"
        self.input_items: list[dict] = []

    async def events(self):
        for _ in range(self.deltas):
            yield {"type": "response.output_text.delta", "delta": "x"}
        yield {"type": "response.completed", "response": self.snapshot("completed")}

    def end(self, status: str, error: dict[str, str] | None = None) -> dict:
        return self.snapshot(status)

    def snapshot(self, status: str) -> dict:
        return {"id": self.id, "status": status}


def test_finished_runs_keep_their_events_within_a_run_count_and_an_event_budget():
    async def kept_after(runs: BackgroundRuns, deltas: list[int]) -> list[list[bool]]:
        kept = []
        for i, n in enumerate(deltas):
            await runs.start(CountedRun(f"r{i}", n)).task
            await asyncio.sleep(0)  # the task's done callback runs on the next turn of the loop
            kept.append([runs.get(f"r{j}") is not None for j in range(i + 1)])
        return kept

    by_events = asyncio.run(kept_after(BackgroundRuns(keep_finished=8, keep_events=25), [9, 9, 9, 30]))
    assert by_events == [[True], [True, True], [False, True, True], [False, False, False, False]], \
        "10 events each: the third pushes out the first; one run alone over the budget is not kept either"
    by_count = asyncio.run(kept_after(BackgroundRuns(keep_finished=2, keep_events=1000), [1, 1, 1]))
    assert by_count[-1] == [False, True, True]
