"""400 messages name the parameter the way the client wrote it, never pydantic's union branch tags."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.protocol import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest
from server.validation_errors import validation_error_object


def error_for(**fields: object) -> tuple[str, str | None]:
    return error_in(CompletionRequest, {"model": "tiny", "prompt": "x"} | fields)


def chat_error_for(**fields: object) -> tuple[str, str | None]:
    return error_in(ChatCompletionRequest, {"model": "tiny", "messages": [{"role": "user", "content": "x"}]} | fields)


def error_in(request: type[CompletionRequest | ChatCompletionRequest], body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as raised:
        request.model_validate(body)
    errors = [error | {"loc": ("body", *error["loc"])} for error in raised.value.errors()]
    error = validation_error_object(RequestValidationError(errors))
    return error.message, error.param


@pytest.mark.parametrize(("fields", "message"), [
    ({"stop": 5}, "stop: must be a string or a list of strings"),
    ({"stop": [5]}, "stop[0]: Input should be a valid string"),
    ({"stop": ""}, "stop: String should have at least 1 character"),
    ({"prompt": 5}, "prompt: must be a string or a list of strings or a list of integers "
                    "or a list of lists of integers"),
    ({"prompt": [[-1]]}, "prompt[0][0]: Input should be greater than or equal to 0"),
    ({"prompt": []}, "prompt: List should have at least 1 item after validation, not 0"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids[1]: Input should be greater than or equal to 0"),
    ({"temperature": "hot"}, "temperature: Input should be a valid number"),
    ({"temperature": float("nan")}, "temperature: Input should be a finite number"),
    ({"logit_bias": {"5": float("inf")}}, "logit_bias.5: Input should be a finite number"),
    # too many prompts of a right type: the bound, not the other branches' type errors on the first element
    ({"prompt": ["a"] * (MAX_PROMPTS + 1)},
     f"prompt: List should have at most {MAX_PROMPTS} items after validation, not {MAX_PROMPTS + 1}"),
    ({"prompt": [[1]] * (MAX_PROMPTS + 1)},
     f"prompt: List should have at most {MAX_PROMPTS} items after validation, not {MAX_PROMPTS + 1}"),
    ({"stream_options": {"fast": True}}, "stream_options.fast: unknown or unsupported parameter"),
])
def test_message_names_the_parameter_as_written(fields, message):
    assert error_for(**fields) == (message, next(iter(fields)))


def test_no_message_carries_a_pydantic_type_tag():
    for fields in ({"stop": 5}, {"stop": [5]}, {"prompt": [[True]]}, {"prompt": [1.5]}, {"logit_bias": {"1": "x"}}):
        message, _ = error_for(**fields)
        assert "constrained" not in message and "list[" not in message, message


@pytest.mark.parametrize(("fields", "message"), [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string or a list of objects"),
    ({"messages": [{"role": "assistant", "content": 5}]},
     "messages[0].content: must be a string or a list of objects"),
    ({"tool_choice": {"type": "x", "function": {"name": "f"}}}, "tool_choice.type: Input should be 'function'"),
])
def test_a_union_inside_the_body_is_named_as_written_too(fields, message):
    assert chat_error_for(**fields) == (message, next(iter(fields)))
