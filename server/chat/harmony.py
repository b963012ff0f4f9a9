"""GPT-OSS chat prompts in OpenAI's harmony format, token for token as openai-harmony renders them.

openai-harmony (the format's own implementation, its vocabulary taken from the checkpoint: see
harmony_encoding) renders the head: the system message and the tool namespace (harmony_head says why not
the rest). This module frames the conversation's messages itself, as harmony frames them:
`<|start|>AUTHOR[ to=RECIPIENT][<|channel|>CHANNEL[ CONTENT_TYPE]]<|message|>TEXT<|end|>` (`<|call|>` for an
assistant message to a recipient), with harmony's rule for dropping analysis messages. Output is parsed by
the project's HarmonyOutputParser: see its docstring for why.

A chat-completions conversation maps onto harmony messages so:
- system: openai-harmony's SystemContent defaults (identity, knowledge cutoff, valid channels, as vLLM
  sends them) with `Reasoning: <effort>` and the current date;
- developer: every OpenAI system and developer message's text under `# Instructions`, in order, joined
  by blank lines, and the function tools under `# Tools` (left out when there is neither) -- gpt-oss was
  trained to take instructions from the developer role, the system role being the header above;
- an assistant turn: its reasoning on the analysis channel, its text on the final channel (on the
  commentary channel, as a preamble, when the turn also makes tool calls), then one commentary message
  per call to `functions.NAME`, content type `<|constrain|>json`, arguments verbatim, ended by `<|call|>`;
  as openai-harmony does, analysis messages that precede a final answer are dropped, so only reasoning
  since the last answer (an unfinished turn, tool calls in flight) is shown to the model again;
- a `tool` message: from `functions.NAME` to the assistant on the commentary channel, NAME found from
  the assistant call whose id its `tool_call_id` names (a deprecated `function` message names it itself);
- `<|start|>assistant`, for the model to continue (vLLM's `add_generation_prompt`, the default), or nothing,
  or with `continue_final_message` the final assistant message left open: its last message without an end
  token and, as while it was being generated, its own reasoning kept.
Built-in tools' calls carry their own recipient as name (`browser.search`, `python`) and go back as such.
Text is rendered as ordinary text, so a user who types "<|end|>" cannot close their message early.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import openai_harmony as oh

from server.chat.harmony_encoding import harmony_encoding
from server.chat.harmony_head import HarmonyHead
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
        self._head = HarmonyHead(tokenizer, self.tokens, harmony_encoding(tokenizer))
        # A channel and content type are this module's own few words; `encode` places <|constrain|> but is slow.
        self._encode_kind = functools.lru_cache(maxsize=16)(tokenizer.encode)
        # <|end|> closes analysis messages mid-answer, so it is no stop token; <|call|> ends a tool call.
        self.stop_token_ids = frozenset((self.tokens.return_, self.tokens.call, self.tokens.endoftext))
        self.template_text: str | None = None  # harmony renders the prompt, not a template

    def render(self, messages: list[ChatMessage], *, tools: list[FunctionTool] | None = None,
               reasoning_effort: str | None = None, current_date: str | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               variables: Mapping[str, Any] | None = None) -> list[int]:
        """Prompt ids ending with `<|start|>assistant` (see the module docstring for the other two endings);
        `current_date` is YYYY-MM-DD, default today. There is no template, so no ``variables`` for one."""
        if variables:
            raise ValueError(f"a harmony prompt has no template to take {', '.join(sorted(variables))}")
        effort = reasoning_effort or DEFAULT_REASONING_EFFORT
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
        date = current_date or datetime.date.today().isoformat()
        instructions = "\n\n".join(m.content for m in messages if m.role in INSTRUCTION_ROLES and m.content)
        ids = self._head.ids(effort, date, instructions, tools or [])
        if continue_final_message:
            opened = open_messages(messages[-1])
            for message in kept(conversation_messages(messages[:-1])):
                ids += self._frame(message)
            for message in opened:
                ids += self._frame(message)
            return ids[:-1]  # the last message stays open
        for message in kept(conversation_messages(messages)):
            ids += self._frame(message)
        if not add_generation_prompt:
            return ids
        return ids + [self.tokens.start] + self.tokenizer.encode_ordinary("assistant")

    def parser(self, continued: ChatMessage | None = None, skip_special_tokens: bool = True) -> HarmonyOutputParser:
        """A parser for what follows the prompt; ``continued``: the final message the prompt left open;
        ``skip_special_tokens=False``: special tokens that are not harmony's structure come out as text."""
        inside = None
        if continued is not None:
            inside = "reasoning" if continued.reasoning and not continued.content else "content"
        return HarmonyOutputParser(self.tokenizer, self.tokens, inside, skip_special_tokens)

    def call_header(self, tool_name: str) -> list[int]:
        """The ids after the prompt's `<|start|>assistant` that open a call to the tool, up to `<|message|>`:
        ` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>`, framed as past calls are (the
        way openai-harmony renders them), so a forced call reads like one the model made."""
        message, = assistant_messages(ChatMessage("assistant", "", tool_calls=[ToolCall("", tool_name, "")]))
        opening = [self.tokens.start] + self.tokenizer.encode_ordinary("assistant")
        ids = self._frame(message)
        if ids[: len(opening)] != opening:
            raise ValueError(f"the call header for {tool_name!r} does not follow `<|start|>assistant`")
        return ids[len(opening): -1]  # the empty arguments leave `<|message|>` last, then `<|call|>`

    def _frame(self, message: oh.Message) -> list[int]:
        author = message.author.name or message.author.role.value
        header = f"{author} to={message.recipient}" if message.recipient else author
        ids = [self.tokens.start] + self.tokenizer.encode_ordinary(header)
        if message.channel:
            kind = f"{message.channel} {message.content_type}" if message.content_type else message.channel
            ids += [self.tokens.channel] + self._encode_kind(kind)
        text = "".join(part.text for part in message.content)
        calls = message.author.role == oh.Role.ASSISTANT and message.recipient
        return ids + [self.tokens.message] + self.tokenizer.encode_ordinary(text) + [
            self.tokens.call if calls else self.tokens.end]


def kept(messages: list[oh.Message]) -> list[oh.Message]:
    """openai-harmony's rule: analysis messages before the last final-channel message are left out."""
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


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
            author = oh.Author.new(oh.Role.TOOL, recipient(result_source(message, calls)))
            harmony.append(oh.Message.from_author_and_content(author, message.content)
                           .with_recipient("assistant").with_channel("commentary"))
    return harmony


def open_messages(message: ChatMessage) -> list[oh.Message]:
    """The harmony messages of the final assistant message that is to be continued: an empty one opens the
    final channel."""
    if message.role != "assistant":
        raise ValueError("continue_final_message needs the final message to be an assistant message")
    if message.tool_calls:
        raise ValueError("continue_final_message cannot continue a message that makes tool calls")
    final = oh.Message.from_role_and_content(oh.Role.ASSISTANT, "").with_channel("final")
    return assistant_messages(message) or [final]


def result_source(message: ChatMessage, calls: dict[str, ToolCall]) -> str:
    """The tool a result comes from: the earlier call its id names, or the function a legacy message names."""
    if message.tool_call_id is None and message.name:
        return message.name
    call = calls.get(message.tool_call_id or "")
    if call is None:
        raise ValueError(f"tool message's tool_call_id {message.tool_call_id!r} names no earlier tool call")
    return call.name


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
