"""GET /v1/models, and the registry of served models every route looks a request's ``model`` up in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from server.chat import HarmonyChatFormat, TemplateChatFormat
from server.config import FrontendConfig
from server.engine.core_client import EngineCoreClient
from server.generation_defaults import GenerationDefaults
from server.protocol import GATEWAY_RESPONSES, APIError, ErrorResponse, ModelCard, ModelList

router = APIRouter()


@dataclass(slots=True)
class ServedModel:
    name: str
    engine: EngineCoreClient
    chat_format: HarmonyChatFormat | TemplateChatFormat
    created: int  # unix time the server started serving it
    tokenizer_info: dict[str, Any]  # GET /tokenizer_info's body (server/tokenizer_info.py)
    generation: GenerationDefaults  # its end tokens and sampling defaults (server/generation_defaults.py)
    frontend: FrontendConfig = FrontendConfig()  # what requests may ask for, how answers are shaped (server flags)
    root: str = ""  # the path or hub id it was given as ("": its name)

    @property
    def max_logprobs(self) -> int:
        """The most alternatives a token a request may ask for (--max-logprobs; -1: the vocabulary)."""
        limit = self.frontend.max_logprobs
        return limit if limit >= 0 else self.engine.tokenizer.vocab_size

    @property
    def chat_stop_ids(self) -> frozenset[int]:
        """What ends a chat choice: the chat format's end tokens and the model's own."""
        return self.chat_format.stop_token_ids | self.generation.eos_token_ids

    def tokens_as_ids(self, asked: bool | None) -> bool:
        """Whether logprobs name tokens "token_id:N": as the request asks, else as --return-tokens-as-token-ids."""
        return self.frontend.return_tokens_as_token_ids if asked is None else asked

    def check_logprobs(self, **asked: int | None) -> None:
        """Each of a request's logprob counts within --max-logprobs, else a 400 naming the field."""
        for param, count in asked.items():
            if count is not None and count > self.max_logprobs:
                raise APIError(400, f"{param}: at most {self.max_logprobs} alternatives a token on this server "
                               "(--max-logprobs)", param=param)

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, max_model_len=self.engine.max_model_len,
                         root=self.root or self.name)


def find_model(request: Request, name: str | None) -> ServedModel:
    """The model a request names; a request that names none (the tokenizer endpoints allow it, as vLLM's do) gets
    the only one served."""
    served: dict[str, ServedModel] = request.app.state.models
    name = request.app.state.model_aliases.get(name, name)
    if name is None:
        if len(served) == 1:
            return next(iter(served.values()))
        raise APIError(400, f"model: required, as this server serves {sorted(served)}", param="model")
    if name not in served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {sorted(served)}",
                       param="model", type="not_found_error", code="model_not_found")
    return served[name]


@router.get("/v1/models", response_model=ModelList, responses=GATEWAY_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model.card() for model in request.app.state.models.values()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses=GATEWAY_RESPONSES | {404: {"model": ErrorResponse, "description": "unknown model"}})
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    return find_model(request, model_id).card()
