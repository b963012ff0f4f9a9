"""GPT-OSS chat prompts in OpenAI's harmony format, token for token as openai-harmony renders them.

A chat-completions conversation becomes:
- a system message: model identity, knowledge cutoff, current date, `Reasoning: <effort>` and the
  valid-channels line (openai-harmony's SystemContent defaults, as vLLM sends them);
- a developer message with every OpenAI system and developer message's text under `# Instructions`,
  in order, joined by blank lines (left out when there is none) -- gpt-oss was trained to take
  instructions from the developer role, the system role being the harmony header above;
- user messages; assistant messages on the final channel. An assistant turn's reasoning goes on the
  analysis channel only when no final answer follows it: harmony drops chain of thought once a final
  answer was given, so only reasoning of an unfinished last turn is shown to the model again;
- `<|start|>assistant`, for the model to continue.
Text is encoded with `encode_ordinary` and structure tokens are placed by id, so a user who types
"<|end|>" cannot close their message early.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from server.chat.harmony_parser import HarmonyOutputParser, HarmonySpecialTokens
from server.chat.messages import ChatMessage

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_REASONING_EFFORT = "medium"
VALID_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
INSTRUCTION_ROLES = ("system", "developer")


class HarmonyChatFormat:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens = HarmonySpecialTokens.from_tokenizer(tokenizer)
        # <|end|> closes analysis messages mid-answer, so it is no stop token; <|call|> ends a tool call.
        self.stop_token_ids = frozenset((self.tokens.return_, self.tokens.call, self.tokens.endoftext))

    def render(self, messages: list[ChatMessage], *, reasoning_effort: str | None = None,
               current_date: str | None = None) -> list[int]:
        """Prompt ids ending with `<|start|>assistant`; `current_date` is YYYY-MM-DD, default today."""
        effort = reasoning_effort or DEFAULT_REASONING_EFFORT
        if effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
        date = current_date or datetime.date.today().isoformat()
        for message in messages:
            if message.role not in (*INSTRUCTION_ROLES, "user", "assistant"):
                raise ValueError(f"unsupported chat message role {message.role!r}")

        ids = self._message("system", None, system_text(effort, date))
        instructions = [m.content for m in messages if m.role in INSTRUCTION_ROLES and m.content]
        if instructions:
            ids += self._message("developer", None, "# Instructions\n\n" + "\n\n".join(instructions))
        last_answer = max((i for i, m in enumerate(messages) if m.role == "assistant" and m.content), default=-1)
        for index, message in enumerate(messages):
            if message.role == "user":
                ids += self._message("user", None, message.content)
            elif message.role == "assistant":
                if message.reasoning and index > last_answer:
                    ids += self._message("assistant", "analysis", message.reasoning)
                if message.content:
                    ids += self._message("assistant", "final", message.content)
        return ids + [self.tokens.start] + self.tokenizer.encode_ordinary("assistant")

    def parser(self) -> HarmonyOutputParser:
        return HarmonyOutputParser(self.tokenizer, self.tokens)

    def _message(self, role: str, channel: str | None, text: str) -> list[int]:
        """`<|start|>role[<|channel|>channel]<|message|>text<|end|>`, each text piece encoded on its own."""
        ids = [self.tokens.start] + self.tokenizer.encode_ordinary(role)
        if channel is not None:
            ids += [self.tokens.channel] + self.tokenizer.encode_ordinary(channel)
        ids += [self.tokens.message] + self.tokenizer.encode_ordinary(text) + [self.tokens.end]
        return ids


def system_text(reasoning_effort: str, current_date: str) -> str:
    header = f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {current_date}"
    return f"{header}\n\nReasoning: {reasoning_effort}\n\n{VALID_CHANNELS}"
