"""A chat request's messages and tools, rendered to prompt ids by the model's chat format.

`render_chat_prompt` is the one place this happens, so every route that shows or counts a chat prompt
(chat completions, /tokenize) renders the same ids.

vLLM's template extras: `chat_template` (a request's own template, on a server started with
--trust-request-chat-template), `chat_template_kwargs` (more template variables, over the server's
--default-chat-template-kwargs) and `documents` (the template's
`documents`) reach a Jinja template (GPT-2's). GPT-OSS's prompt is harmony's, rendered without a template: of
the kwargs it takes only what harmony has, `reasoning_effort` and `current_date`; the rest are 400s, as is a
template or documents for it.

tool_choice: "auto" (the default) and "none" follow OpenAI; with "none" the tools are left out of the
prompt, so the model is not told of them. "required" and a named function render the prompt exactly as
"auto" does; the call is forced by constrained decoding, not by the prompt (see routes.forced_call).
parallel_tool_calls false limits a plain template's forced "required" output to one call; a harmony turn ends
at its first `<|call|>`, so there a choice holds at most one generated call either way. Tools a chat template
does not render are a 400 naming `tools`, never dropped unseen.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import jinja2
from pydantic import BaseModel, ValidationError

from server.chat import ChatMessage, FunctionTool, HarmonyChatFormat, TemplateChatFormat, ToolCall
from server.chat.template import RenderLimits, TemplateLimitExceeded
from server.protocol import APIError, ChatCompletionRequest
from server.protocol_messages import AssistantMessage, ChatMessageParam, FunctionMessage, TextContentPart, ToolMessage
from server.protocol_tools import ChatTool, NamedToolChoice
from server.routes.models import ServedModel

HARMONY_VARIABLES = ("reasoning_effort", "current_date")  # what chat_template_kwargs may set on GPT-OSS
# A request's own template may render for this long, and write this many characters for each token of context
# (far more than any prompt that fits: a token is a few characters)
REQUEST_TEMPLATE_SECONDS = 5.0
REQUEST_TEMPLATE_CHARS_PER_TOKEN = 64


async def render_chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    """Prompt ids for the conversation; bad input is a 400 naming the parameter. A request's own template renders
    in a worker thread, within REQUEST_TEMPLATE_SECONDS and _CHARS_PER_TOKEN, so the event loop keeps serving."""
    if body.chat_template is None:
        return rendered_chat_prompt(served, body)
    return await asyncio.to_thread(rendered_chat_prompt, served, body)


CHAT_FIELDS = ("messages", "tools", "tool_choice", "reasoning_effort", "add_generation_prompt",
               "continue_final_message", "chat_template", "chat_template_kwargs", "documents")


async def render_chat_fields(served: ServedModel, body: BaseModel) -> list[int]:
    """The prompt the chat request made of ``body``'s chat fields would have (/tokenize's and /v1/embeddings' chat
    forms), rendered by the chat endpoint's own code."""
    fields = {name: getattr(body, name) for name in CHAT_FIELDS if getattr(body, name, None) is not None}
    fields["model"] = served.name  # the body may leave it out
    try:
        chat_request = ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        path = ".".join(str(part) for part in first["loc"])
        raise APIError(400, f"{path}: {first['msg']}", param=str(first["loc"][0])) from None
    return await render_chat_prompt(served, chat_request)


def rendered_chat_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    if body.add_generation_prompt and body.continue_final_message:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false (the final message is "
                       "continued, no new one started)", param="continue_final_message")
    chat_format = request_chat_format(served, body.chat_template)
    variables = template_variables(served, chat_format, body.chat_template_kwargs, body.reasoning_effort)
    if body.documents is not None:
        if not isinstance(chat_format, TemplateChatFormat) or not chat_format.uses_documents:
            raise APIError(400, "documents: this model's chat template does not use them", param="documents")
        variables.rest["documents"] = body.documents
    offered = function_tools(body.tools or [], body.tool_choice)
    return render_messages(chat_format, [chat_message(m) for m in body.messages], offered, variables,
                           add_generation_prompt=body.add_generation_prompt,
                           continue_final_message=body.continue_final_message)


@dataclass(slots=True)
class TemplateVariables:
    """What a prompt is rendered with beyond its messages and tools."""

    reasoning_effort: str | None = None
    current_date: str | None = None  # harmony's; a template's comes in rest
    rest: dict[str, Any] = field(default_factory=dict)  # more variables for a Jinja template


def template_variables(served: ServedModel, chat_format: HarmonyChatFormat | TemplateChatFormat,
                       asked: dict[str, Any] | None, reasoning_effort: str | None) -> TemplateVariables:
    """The server's --default-chat-template-kwargs under a request's chat_template_kwargs, as vLLM merges them. The
    request's reasoning_effort field wins over a default one, and must agree with its own kwargs'."""
    own_effort = (asked or {}).get("reasoning_effort")
    if None not in (own_effort, reasoning_effort) and own_effort != reasoning_effort:
        raise APIError(400, "chat_template_kwargs sets reasoning_effort to another value than the request's",
                       param="chat_template_kwargs")
    rest = {**served.frontend.default_chat_template_kwargs, **(asked or {})}
    default_effort = rest.pop("reasoning_effort", None)
    variables = TemplateVariables(reasoning_effort or default_effort, rest=rest)
    if isinstance(chat_format, HarmonyChatFormat):
        variables.current_date = rest.pop("current_date", None)
        problem = harmony_variables_problem(rest, variables.reasoning_effort, variables.current_date)
        if problem:
            raise APIError(400, f"chat_template_kwargs: {problem}", param="chat_template_kwargs")
    return variables


def request_chat_format(served: ServedModel, chat_template: str | None) -> HarmonyChatFormat | TemplateChatFormat:
    """The model's chat format, or one of the request's own template where the server allows it."""
    if chat_template is None:
        return served.chat_format
    if isinstance(served.chat_format, HarmonyChatFormat):
        raise APIError(400, "chat_template: GPT-OSS's prompt is harmony's, rendered without a template",
                       param="chat_template")
    if not served.frontend.trust_request_chat_template:
        raise APIError(400, "chat_template: this server takes no chat template from requests (it would need "
                       "--trust-request-chat-template)", param="chat_template")
    limits = RenderLimits(REQUEST_TEMPLATE_SECONDS, served.engine.max_model_len * REQUEST_TEMPLATE_CHARS_PER_TOKEN)
    try:
        return TemplateChatFormat(served.engine.tokenizer, chat_template, limits=limits)
    except ValueError as e:
        raise APIError(400, f"chat_template: {e}", param="chat_template") from None


def harmony_variables_problem(rest: dict[str, Any], effort: Any, current_date: Any) -> str | None:
    """What is wrong with template variables given to GPT-OSS (by a request or --default-chat-template-kwargs)."""
    if rest:
        return (f"GPT-OSS's prompt is harmony's, rendered without a template; of the kwargs it takes only "
                f"{' and '.join(HARMONY_VARIABLES)}, not {', '.join(sorted(rest))}")
    if effort is not None and effort not in ("low", "medium", "high"):
        return "reasoning_effort must be low, medium or high"
    if current_date is not None and not isinstance(current_date, str):
        return "current_date must be a string (YYYY-MM-DD)"
    return None


def render_messages(chat_format: HarmonyChatFormat | TemplateChatFormat, messages: list[ChatMessage],
                    tools: list[FunctionTool], variables: TemplateVariables, param: str = "messages", *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
    if tools and isinstance(chat_format, TemplateChatFormat) and not chat_format.uses_tools:
        raise APIError(400, "tools: this model's chat template does not render them (it never mentions `tools`); "
                       "tool calling needs a GPT-OSS model or a --chat-template that renders them", param="tools")
    try:
        return chat_format.render(messages, tools=tools, reasoning_effort=variables.reasoning_effort,
                                  current_date=variables.current_date, add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message, variables=variables.rest)
    except TemplateLimitExceeded as e:  # only a request's own template has limits
        raise APIError(400, f"chat_template: {e}", param="chat_template") from None
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


def check_auto_tool_choice(served: ServedModel, offered: list[FunctionTool], tool_choice: str | None) -> None:
    """--no-enable-auto-tool-choice: tools offered with tool_choice "auto" (or None, the default with tools; a
    named choice is "named") are refused."""
    if offered and tool_choice in (None, "auto") and not served.frontend.enable_auto_tool_choice:
        raise APIError(400, 'tool_choice "auto" (the default when tools are given) is off on this server '
                       '(--no-enable-auto-tool-choice): give "none", "required" or a named function',
                       param="tool_choice")


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
