"""One completion choice as it grows: UTF-8-safe text, stop strings held back, logprobs in OpenAI's legacy form."""

from __future__ import annotations

from typing import Any, Literal

from models.tokenizer import Tokenizer
from server.detokenizer import StopStringMatcher, TokenTextDecoder, token_id_name, token_text
from server.engine.outputs import ChoiceOutput, TokenLogprob
from server.protocol import CompletionLogprobs, PromptLogprobs
from server.routes.engine_calls import raise_if_failed


class TextChoice:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], logprobs: int | None,
                 include_stop: bool = False, tokens_as_ids: bool = False, skip_special_tokens: bool = True,
                 named_stop_ids: frozenset[int] = frozenset()) -> None:
        """``named_stop_ids``: the stop tokens stop_reason names when one ends the choice (GenerationDefaults')."""
        self._tokenizer = tokenizer
        self._tokens_as_ids = tokens_as_ids  # logprobs name tokens "token_id:N" (text offsets stay the text's)
        self._detokenizer = TokenTextDecoder(tokenizer, skip_special_tokens)
        self._stop = StopStringMatcher(stop, include_stop)
        self._named_stop_ids = named_stop_ids
        self._top_k = logprobs
        self.text = ""
        self.token_ids: list[int] = []  # every token generated, a stop token included
        self.logprobs = CompletionLogprobs() if logprobs is not None else None
        self.prompt_logprobs: PromptLogprobs | None = None  # vLLM's prompt_logprobs, when asked for
        self.finish_reason: Literal["stop", "length"] | None = None
        self.stop_reason: str | int | None = None  # vLLM's: the stop string or client stop token that ended it
        self._sent_chars = 0
        self._sent_tokens = 0
        self._next_offset: int | None = None  # where the next scored token's text starts; None: at the text's end
        self._sent_logprobs = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def stopped_by_string(self) -> bool:
        return self._stop.matched is not None

    def logged(self) -> dict[str, Any]:
        """What --enable-log-outputs writes of it."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason}

    def echo(self, prompt_ids: list[int], prompt_logprobs: list[TokenLogprob | None] | None) -> None:
        """The prompt goes first in the text; with logprobs its tokens are scored too (the first one is null)."""
        self.text = self._tokenizer.decode(prompt_ids)
        if self.logprobs is not None:
            scores = prompt_logprobs or [None] * len(prompt_ids)
            self._next_offset = 0
            for token_id, score in zip(prompt_ids, scores):
                self._add_logprob(self.logprobs, token_id, score)

    def add(self, output: ChoiceOutput) -> None:
        """Take in one engine output; ignored once this choice is done (a stop string ended it early). The
        tokens after the one that completes a stop string are dropped, as if never generated; a stop token
        counts and is scored but adds no text (unless include_stop_str_in_output)."""
        if self.done:
            return
        finish_reason = raise_if_failed(output)
        scores = output.logprobs or []
        text = ""
        for position, token_id in enumerate(output.new_token_ids):
            self.token_ids.append(token_id)
            if self.logprobs is not None and position < len(scores):
                self._add_logprob(self.logprobs, token_id, scores[position])
            if token_id != output.stop_token_id or self._stop.keep_match:
                text += self._stop.feed(self._detokenizer.feed(token_id))
            if self.stopped_by_string:
                break
        if finish_reason is not None and not self.stopped_by_string:
            text += self._stop.feed(self._detokenizer.flush())
            text += "" if self.stopped_by_string else self._stop.flush()
        self.text += text
        if self.stopped_by_string:
            self.finish_reason, self.stop_reason = "stop", self._stop.matched
        elif finish_reason is not None:
            self.finish_reason = finish_reason
            if output.stop_token_id in self._named_stop_ids:
                self.stop_reason = output.stop_token_id

    def take_delta(self) -> tuple[str, list[int], CompletionLogprobs | None]:
        """Text, token ids and logprobs added since the last call, for the next stream chunk."""
        text = self.text[self._sent_chars :]
        self._sent_chars = len(self.text)
        token_ids = self.token_ids[self._sent_tokens :]
        self._sent_tokens = len(self.token_ids)
        if self.logprobs is None:
            return text, token_ids, None
        start, self._sent_logprobs = self._sent_logprobs, len(self.logprobs.tokens)
        lp = self.logprobs
        return text, token_ids, CompletionLogprobs(
            tokens=lp.tokens[start:], token_logprobs=lp.token_logprobs[start:], top_logprobs=lp.top_logprobs[start:],
            text_offset=lp.text_offset[start:])

    def _add_logprob(self, lp: CompletionLogprobs, token_id: int, score: TokenLogprob | None) -> None:
        offset = len(self.text) if self._next_offset is None else self._next_offset
        text = token_text(self._tokenizer, token_id)
        token = token_id_name(token_id) if self._tokens_as_ids else text
        lp.tokens.append(token)
        lp.text_offset.append(offset)
        if score is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
        else:
            lp.token_logprobs.append(score.logprob)
            top = {self._name(t): value for t, value in score.top[: self._top_k]}
            lp.top_logprobs.append(top | {token: score.logprob})
        self._next_offset = offset + len(text)

    def _name(self, token_id: int) -> str:
        return token_id_name(token_id) if self._tokens_as_ids else token_text(self._tokenizer, token_id)
