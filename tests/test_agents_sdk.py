"""The OpenAI Agents SDK as the client: an agent with a function tool runs its loop over the Responses API, its
state kept by the server (a conversation named by `conversation_id`) or by the SDK's own conversation session
(OpenAIConversationsSession, which reads and writes the Conversations API's items).

A scripted engine stands in for GPT-OSS, as in test_responses_api: the first turn calls get_weather, the next
answers. openai-harmony renders the prompt the answering turn must see.
"""

from __future__ import annotations

import asyncio
import json

import agents
import agents.memory
import httpx
import openai
import pytest

from server.app import create_app
from server.config import ServerConfig
from server.generation_defaults import GenerationDefaults
from server.routes.models import ServedModel
from tests.test_chat_harmony import chat, harmony, tokenizer  # noqa: F401 - fixtures
from tests.test_responses_api import engine, scripts  # noqa: F401 - fixtures
from tests.test_tool_calls_api import ARGUMENTS, prompt_after_weather_call


class TurnScripts:
    """Each generate call takes the next script; the engine keeps the last one it was given."""

    def __init__(self, engine, turns: list[list[int]]) -> None:
        self.engine, self.turns = engine, list(turns)
        self.generate = engine.generate

    def __enter__(self) -> TurnScripts:
        def generate(*args, **kwargs):
            if self.turns:
                self.engine.script = self.turns.pop(0)
            return self.generate(*args, **kwargs)

        self.engine.generate = generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.generate  # the class's own again


@pytest.fixture
def client(chat, engine):
    """An AsyncOpenAI client on the app, in this process (httpx's ASGI transport)."""
    app = create_app(ServerConfig(), {})
    app.state.models["oss"] = ServedModel("oss", engine, chat, 0, {}, GenerationDefaults(chat.stop_token_ids))
    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    transport = httpx.ASGITransport(app=app)
    http = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    yield openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    asyncio.run(http.aclose())


def weather_agent(client) -> agents.Agent:
    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        assert city == json.loads(ARGUMENTS)["city"]
        return "sunny"

    model = agents.OpenAIResponsesModel(model="oss", openai_client=client)
    return agents.Agent(name="weather", model=model, tools=[get_weather])


def test_an_agent_loop_kept_in_a_server_conversation(client, engine, scripts, harmony):
    async def run() -> tuple[agents.RunResult, list]:
        conversation = await client.conversations.create()
        result = await agents.Runner.run(agent, "Weather in Oslo?", conversation_id=conversation.id)
        items = [item async for item in client.conversations.items.list(conversation.id, order="asc")]
        return result, items

    agent = weather_agent(client)
    with TurnScripts(engine, [scripts["call"], scripts["answer"]]):
        result, items = asyncio.run(run())
    assert result.final_output == "Hello there!"
    assert engine.prompts[-1] == prompt_after_weather_call(harmony, tool_of(agent), "Need weather.")
    assert [item.type for item in items] == ["message", "reasoning", "function_call", "function_call_output",
                                             "reasoning", "message"]


def test_an_agent_loop_kept_in_the_sdks_conversation_session(client, engine, scripts, harmony):
    """The session reads the conversation's items and adds the run's new ones itself; the second run starts from
    the first one's whole exchange."""
    async def run() -> list:
        session = agents.memory.OpenAIConversationsSession(openai_client=client)
        first = await agents.Runner.run(agent, "Weather in Oslo?", session=session)
        second = await agents.Runner.run(agent, "Thanks!", session=session)
        return [first.final_output, second.final_output, await session.get_items()]

    agent = weather_agent(client)
    with TurnScripts(engine, [scripts["call"], scripts["answer"], scripts["answer"]]):
        first, second, items = asyncio.run(run())
    assert first == second == "Hello there!"
    assert [(item["type"], item.get("role")) for item in items] == [
        ("message", "user"), ("reasoning", None), ("function_call", None), ("function_call_output", None),
        ("reasoning", None), ("message", "assistant"), ("message", "user"), ("reasoning", None),
        ("message", "assistant")]
    assert engine.prompts[-2] == prompt_after_weather_call(harmony, tool_of(agent), "Need weather.")
    assert len(engine.prompts[-1]) > len(engine.prompts[-2])  # the whole first run, then "Thanks!"


def tool_of(agent: agents.Agent) -> dict:
    """The tool as the SDK sends it: the schema it made from the function's signature (pydantic's titles too)."""
    [tool] = agent.tools
    return {"name": tool.name, "description": tool.description, "parameters": tool.params_json_schema}

