"""GPT-OSS chat prompts in OpenAI's harmony format, rendered by openai-harmony itself.

Why openai-harmony at run time: it is the format's own implementation, and the tool namespace (JSON
schemas turned into TypeScript-like declarations, the system line that sends calls to the commentary
channel) follows rules only it defines exactly. Its vocabulary comes from the checkpoint (see
harmony_encoding). Output is parsed by the project's HarmonyOutputParser instead: see its docstring.

This module maps a chat-completions conversation onto harmony messages:
- system: openai-harmony's SystemContent defaults (identity, knowledge cutoff, valid channels, as vLLM
  sends them) with `Reasoning: <effort>` and the current date;
- developer: every OpenAI system and developer message's text under `# Instructions`, in order, joined
  by blank lines, and the function tools under `# Tools` (left out when there is neither) -- gpt-oss was
  trained to take instructions from the developer role, the system role being the header above;
- an assistant turn: its reasoning on the analysis channel, its text on the final channel (on the
  commentary channel, as a preamble, when the turn also makes tool calls), then one commentary message
  per call to `functions.NAME`, content type `<|constrain|>json`, arguments verbatim, ended by `<|call|>`;
  openai-harmony drops analysis messages that precede a final answer, so only reasoning since the last
  answer (an unfinished turn, tool calls in flight) is shown to the model again;
- a `tool` message: from `functions.NAME` to the assistant on the commentary channel, NAME found from
  the assistant call whose id its `tool_call_id` names;
- `<|start|>assistant`, for the model to continue.
Built-in tools' calls carry their own recipient as name (`browser.search`, `python`) and go back as such.
Text is rendered as ordinary text, so a user who types "<|end|>" cannot close their message early.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import openai_harmony as oh

from server.chat.harmony_encoding import harmony_encoding
from server.chat.harmony_parser import HarmonyOutputParser, HarmonySpecialTokens
from server.chat.messages import ChatMessage, FunctionTool, ToolCall

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"
INSTRUCTION_ROLES = ("system", "developer")
CALL_CONTENT_TYPE = "<|constrain|>json"


class HarmonyChatFormat:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens = HarmonySpecialTokens.from_tokenizer(tokenizer)
        self.encoding = harmony_encoding(tokenizer)
        # <|end|> closes analysis messages mid-answer, so it is no stop token; <|call|> ends a tool call.
        self.stop_token_ids = frozenset((self.tokens.return_, self.tokens.call, self.tokens.endoftext))

    def render(self, messages: list[ChatMessage], *, tools: list[FunctionTool] | None = None,
               reasoning_effort: str | None = None, current_date: str | None = None) -> list[int]:
        """Prompt ids ending with `<|start|>assistant`; `current_date` is YYYY-MM-DD, default today."""
        effort = reasoning_effort or DEFAULT_REASONING_EFFORT
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
        system = (oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
                  .with_conversation_start_date(current_date or datetime.date.today().isoformat()))
        harmony = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        developer = developer_content(messages, tools or [])
        if developer is not None:
            harmony.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
        harmony += conversation_messages(messages)
        return self.encoding.render_conversation_for_completion(oh.Conversation.from_messages(harmony),
                                                                oh.Role.ASSISTANT)

    def parser(self) -> HarmonyOutputParser:
        return HarmonyOutputParser(self.tokenizer, self.tokens)


def developer_content(messages: list[ChatMessage], tools: list[FunctionTool]) -> oh.DeveloperContent | None:
    instructions = [m.content for m in messages if m.role in INSTRUCTION_ROLES and m.content]
    if not instructions and not tools:
        return None
    content = oh.DeveloperContent.new()
    if instructions:
        content = content.with_instructions("\n\n".join(instructions))
    if tools:
        content = content.with_function_tools(
            [oh.ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in tools])
    return content


def conversation_messages(messages: list[ChatMessage]) -> list[oh.Message]:
    calls: dict[str, ToolCall] = {}
    harmony: list[oh.Message] = []
    for message in messages:
        if message.role not in (*INSTRUCTION_ROLES, "user", "assistant", "tool"):
            raise ValueError(f"unsupported chat message role {message.role!r}")
        if message.role == "user":
            harmony.append(oh.Message.from_role_and_content(oh.Role.USER, message.content))
        elif message.role == "assistant":
            calls.update((call.id, call) for call in message.tool_calls)
            harmony += assistant_messages(message)
        elif message.role == "tool":
            call = calls.get(message.tool_call_id or "")
            if call is None:
                raise ValueError(f"tool message's tool_call_id {message.tool_call_id!r} names no earlier tool call")
            author = oh.Author.new(oh.Role.TOOL, recipient(call.name))
            harmony.append(oh.Message.from_author_and_content(author, message.content)
                           .with_recipient("assistant").with_channel("commentary"))
    return harmony


def assistant_messages(message: ChatMessage) -> list[oh.Message]:
    def text(content: str, channel: str) -> oh.Message:
        return oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel(channel)

    harmony = [text(message.reasoning, "analysis")] if message.reasoning else []
    if message.content:
        harmony.append(text(message.content, "commentary" if message.tool_calls else "final"))
    for call in message.tool_calls:
        to = recipient(call.name)
        call_message = text(call.arguments, "commentary").with_recipient(to)
        harmony.append(call_message.with_content_type(CALL_CONTENT_TYPE) if to.startswith("functions.")
                       else call_message)
    return harmony


def recipient(tool_name: str) -> str:
    """Functions live in harmony's `functions` namespace; a built-in tool's name is its recipient already."""
    return tool_name if tool_name == "python" or "." in tool_name else f"functions.{tool_name}"
