"""Chat prompts for models without harmony (GPT-2): a Jinja template renders the conversation as text.

The template sees `messages` (dicts with `role`, `content`, `reasoning`, `tool_calls`, `tool_call_id`),
`tools` (dicts with `name`, `description`, `parameters`), `add_generation_prompt`, `reasoning_effort`,
`current_date`, and whatever else a request gives it (vLLM's `chat_template_kwargs` and `documents`). With
`continue_final_message`, as in transformers, the text is cut where the final message's text ends (found by a
mark appended to it), so the model continues that message. Tools are refused unless
the template's text mentions `tools`: the default one does not, and silently dropping them would let a client
believe the model saw them. The default, DEFAULT_CHAT_TEMPLATE, writes a plain transcript and leaves the model
to continue after "Assistant:":

    System: Be brief.
    User: Hello!
    Assistant:

Template text is trusted, printed values are not: special tokens (`<|endoftext|>`) are recognised
only in the template's own literal text, while everything a `{{ ... }}` expression prints -- message
text above all -- is encoded as ordinary text, so a user typing "<|endoftext|>" cannot inject one.
The whole transcript is still encoded as one text between special tokens, so BPE merges across the
seams (" Hello" stays one token after "User:").
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.chat.json_calls import TaggedCallsParser
from server.chat.messages import ChatDelta, ChatMessage, FunctionTool
from server.detokenizer import TokenTextDecoder

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message.role | capitalize }}: {{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Unicode noncharacters: never part of real text, so they can fence printed values in the output.
VALUE_START, VALUE_END = "\ufdd0", "\ufdd1"
PRINTED_VALUE = re.compile(f"{VALUE_START}(.*?){VALUE_END}", re.DOTALL)
CONTINUE_MARK = "\ufdd2"  # where the final message's text ends, for continue_final_message


def load_chat_template(value: str) -> str:
    """`--chat-template`: a value with Jinja markup is the template itself, anything else a file path."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--chat-template: no such file {value!r} (and no Jinja markup for an inline template)")
    return path.read_text(encoding="utf-8")


def fence_printed_value(value: object) -> str:
    text = "" if value is None else str(value)
    # Strip fences already inside (a captured `{% set %}` block) so printed text is never trusted.
    text = text.replace(VALUE_START, "").replace(VALUE_END, "")
    return f"{VALUE_START}{text}{VALUE_END}"


TOOL_CALL_PARSERS = ("none", "hermes")  # how a template model's own tool calls are read from its text


class TemplateLimitExceeded(ValueError):
    """A request's own template ran longer, or wrote more, than a request's template may."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What rendering a template a request brought may cost: it is code from the client, and neither Jinja's
    sandbox nor its range cap (100,000 a loop, nested at will) bounds its time or its output."""

    seconds: float
    chars: int


def render_within(template: jinja2.Template, context: Mapping[str, Any], limits: RenderLimits) -> str:
    """The template rendered, stopped with TemplateLimitExceeded past ``limits``. A trace function on this thread
    checks the clock at every line the compiled template runs (so a loop that writes nothing is caught too);
    the output is checked piece by piece as Jinja generates it. Slower than a plain render: for templates a
    request brings, rendered off the event loop (server.routes.chat_prompt)."""
    deadline = time.monotonic() + limits.seconds

    def trace(frame: FrameType, event: str, arg: object) -> Callable | None:
        if time.monotonic() > deadline:
            raise TemplateLimitExceeded(f"rendering took longer than {limits.seconds:g} s")
        return trace

    parts: list[str] = []
    written = 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for part in template.generate(context):
            written += len(part)
            if written > limits.chars:
                raise TemplateLimitExceeded(f"the rendered prompt passed {limits.chars:,} characters")
            parts.append(part)
    finally:
        sys.settrace(previous)
    return "".join(parts)


class TemplateChatFormat:
    def __init__(self, tokenizer: Tokenizer, template: str | None = None, tool_call_parser: str = "none",
                 limits: RenderLimits | None = None) -> None:
        """``tool_call_parser`` (--tool-call-parser): "hermes" reads `<tool_call>` JSON from the output of a
        request that offers tools; "none" leaves all output content. ``limits``: what a render may cost (a
        request's own template)."""
        self.limits = limits
        if tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {tool_call_parser!r}: choose {', '.join(TOOL_CALL_PARSERS)}")
        self.tool_call_parser = tool_call_parser
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset((tokenizer.eos_token_id,))
        self.template_text = template if template is not None else DEFAULT_CHAT_TEMPLATE
        self.uses_tools = "tools" in self.template_text
        self.uses_documents = "documents" in self.template_text
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    finalize=fence_printed_value)
        try:
            self.template = environment.from_string(self.template_text)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"invalid chat template: {error}") from error
        names = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_in_literal = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def render(self, messages: list[ChatMessage], *, tools: list[FunctionTool] | None = None,
               reasoning_effort: str | None = None, current_date: str | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               variables: Mapping[str, Any] | None = None) -> list[int]:
        """``variables``: more for the template to see; they may replace reasoning_effort and current_date, not
        the conversation's own (messages, tools, add_generation_prompt)."""
        if tools and not self.uses_tools:
            raise ValueError("this model's chat template does not use `tools`: tool calling needs a GPT-OSS "
                             "model or a --chat-template that renders them")
        listed = [dataclasses.asdict(m) for m in messages]
        if continue_final_message:
            listed[-1]["content"] += CONTINUE_MARK
        context = {"reasoning_effort": reasoning_effort, "current_date": current_date, **(variables or {}),
                   "messages": listed, "tools": [dataclasses.asdict(t) for t in tools or []],
                   "add_generation_prompt": add_generation_prompt}
        text = self.template.render(context) if self.limits is None else render_within(self.template, context,
                                                                                      self.limits)
        if continue_final_message:
            text = cut_at_continue_mark(text)
        return self._encode(text)

    def parser(self, continued: ChatMessage | None = None, skip_special_tokens: bool = True,
               tools: bool = False) -> PlainTextParser | TaggedCallsParser:
        """All output is content, a continued message's too; with ``tools`` offered and a tool call parser, the
        calls the model writes are read out of it."""
        if tools and self.tool_call_parser == "hermes":
            return TaggedCallsParser(self.tokenizer, skip_special_tokens)
        return PlainTextParser(self.tokenizer, skip_special_tokens)

    def _encode(self, fenced: str) -> list[int]:
        """Ordinary text between special tokens; special tokens only where the template's literal text has them."""
        ids: list[int] = []
        run = ""
        for index, part in enumerate(PRINTED_VALUE.split(fenced)):
            if index % 2 == 1 or self._special_in_literal is None:  # a printed value, or no specials at all
                run += part
                continue
            for piece_index, piece in enumerate(self._special_in_literal.split(part)):
                if piece_index % 2 == 0:
                    run += piece
                else:
                    ids += self.tokenizer.encode_ordinary(run) + [self.tokenizer.special_tokens[piece]]
                    run = ""
        return ids + self.tokenizer.encode_ordinary(run)


def cut_at_continue_mark(fenced: str) -> str:
    """The rendered text up to the mark at the end of the final message's text (its last appearance)."""
    at = fenced.rfind(CONTINUE_MARK)
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not print the final message's text")
    in_printed_value = fenced.rfind(VALUE_START, 0, at) > fenced.rfind(VALUE_END, 0, at)
    return fenced[:at] + (VALUE_END if in_printed_value else "")


class PlainTextParser:
    """Everything such a model writes is content; special tokens add no text unless asked to."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._text = TokenTextDecoder(tokenizer, skip_special_tokens)
        self._skipped = frozenset(tokenizer.special_tokens.values()) if skip_special_tokens else frozenset()

    def feed(self, token_id: int) -> ChatDelta:
        return ChatDelta(content=self._text.feed(token_id), settled=[token_id not in self._skipped])

    def finish(self) -> ChatDelta:
        return ChatDelta(content=self._text.flush())
