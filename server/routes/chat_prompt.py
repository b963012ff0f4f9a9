"""A chat request's messages and tools, rendered to prompt ids by the model's chat format.

`render_chat_prompt` is the one place this happens, so every route that shows or counts a chat prompt
(chat completions, /tokenize) renders the same ids.

tool_choice: "auto" (the default) and "none" follow OpenAI; with "none" the tools are left out of the
prompt, so the model is not told of them. "required" and a named function render the prompt exactly as
"auto" does; the call is forced by constrained decoding, not by the prompt (see routes.forced_call).
parallel_tool_calls is accepted either way: a harmony turn ends at its first `<|call|>`, so a choice holds
at most one generated call.
"""

from __future__ import annotations

import jinja2

from server.chat import ChatMessage, FunctionTool, HarmonyChatFormat, TemplateChatFormat, ToolCall
from server.protocol import APIError
from server.protocol_messages import AssistantMessage, ChatMessageParam, FunctionMessage, TextContentPart, ToolMessage
from server.protocol_tools import ChatTool, NamedToolChoice


def render_chat_prompt(chat_format: HarmonyChatFormat | TemplateChatFormat, messages: list[ChatMessageParam], *,
                       tools: list[ChatTool] | None = None, tool_choice: str | NamedToolChoice | None = None,
                       reasoning_effort: str | None = None, add_generation_prompt: bool = True,
                       continue_final_message: bool = False) -> list[int]:
    """Prompt ids for the conversation; bad input is a 400 naming the parameter."""
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false (the final message is "
                       "continued, no new one started)", param="continue_final_message")
    offered = function_tools(tools or [], tool_choice)
    return render_messages(chat_format, [chat_message(m) for m in messages], offered, reasoning_effort,
                           add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)


def render_messages(chat_format: HarmonyChatFormat | TemplateChatFormat, messages: list[ChatMessage],
                    tools: list[FunctionTool], reasoning_effort: str | None, param: str = "messages", *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
    try:
        return chat_format.render(messages, tools=tools, reasoning_effort=reasoning_effort,
                                  add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message)
    except (ValueError, jinja2.TemplateError) as e:
        raise APIError(400, f"{param}: cannot render the conversation: {e}", param=param) from None


def function_tools(tools: list[ChatTool], tool_choice: str | NamedToolChoice | None) -> list[FunctionTool]:
    offered = [FunctionTool(t.function.name, t.function.description or "", t.function.parameters) for t in tools]
    if isinstance(tool_choice, NamedToolChoice):
        return chosen_tools(offered, "named", tool_choice.function.name)
    return chosen_tools(offered, tool_choice)


def chosen_tools(tools: list[FunctionTool], tool_choice: str | None, named: str | None = None) -> list[FunctionTool]:
    """The tools the prompt shows, after the checks tool_choice asks for ("named": `named` must be offered)."""
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions have the same name", param="tools")
    if tool_choice == "required" and not tools:
        raise APIError(400, 'tool_choice "required" needs tools', param="tool_choice")
    if tool_choice == "named" and named not in names:
        raise APIError(400, f"tool_choice names the function {named!r}, which is not in tools", param="tool_choice")
    return [] if tool_choice == "none" else tools


def chat_message(message: ChatMessageParam) -> ChatMessage:
    """The message as chat formats take it; its role's rules were checked when the body was parsed."""
    if isinstance(message, AssistantMessage):
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        if message.function_call is not None:  # answered by a function message, which names the function itself
            calls.append(ToolCall("", message.function_call.name, message.function_call.arguments))
        reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
        return ChatMessage("assistant", assistant_text(message), reasoning=reasoning, tool_calls=calls)
    if isinstance(message, FunctionMessage):
        return ChatMessage("tool", message.content or "", name=message.name)
    content = message.content
    text = "".join(part.text for part in content) if isinstance(content, list) else content or ""
    if isinstance(message, ToolMessage):
        return ChatMessage("tool", text, tool_call_id=message.tool_call_id)
    return ChatMessage(message.role, text)


def assistant_text(message: AssistantMessage) -> str:
    """What the turn said: its text, a refusal part's words in place, or its `refusal` when it has no text."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text if isinstance(part, TextContentPart) else part.refusal for part in content)
    return content or message.refusal or ""
