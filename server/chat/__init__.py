"""Chat formats: conversations to prompt ids, and generated ids back to reasoning and content text.

GPT-OSS speaks harmony (`HarmonyChatFormat`); GPT-2 gets a plain Jinja transcript (`TemplateChatFormat`).
Both offer `render(messages, *, tools, reasoning_effort, current_date) -> list[int]`, `stop_token_ids` and
`parser() -> ChatOutputParser`.
"""

from server.chat.harmony import HarmonyChatFormat
from server.chat.messages import ChatDelta, ChatMessage, ChatOutputParser, FunctionTool, ToolCall, ToolCallDelta
from server.chat.template import DEFAULT_CHAT_TEMPLATE, TemplateChatFormat, load_chat_template

__all__ = ["ChatDelta", "ChatMessage", "ChatOutputParser", "DEFAULT_CHAT_TEMPLATE", "FunctionTool",
           "HarmonyChatFormat", "TemplateChatFormat", "ToolCall", "ToolCallDelta", "load_chat_template"]
