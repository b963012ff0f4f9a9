"""One completion choice as it grows: UTF-8-safe text, stop strings held back, logprobs in OpenAI's legacy form."""

from __future__ import annotations

from typing import Literal

from models.tokenizer import Tokenizer
from server.detokenizer import IncrementalDetokenizer, StopStringMatcher, token_text
from server.engine.outputs import ChoiceOutput, TokenLogprob
from server.protocol import CompletionLogprobs
from server.routes.engine_calls import raise_if_failed


class TextChoice:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], logprobs: int | None,
                 include_stop: bool = False) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = StopStringMatcher(stop, include_stop)
        self._top_k = logprobs
        self.text = ""
        self.logprobs = CompletionLogprobs() if logprobs is not None else None
        self.num_tokens = 0
        self.finish_reason: Literal["stop", "length"] | None = None
        self._sent_chars = 0
        self._sent_logprobs = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        return self._stop.matched is not None

    def echo(self, prompt_ids: list[int], prompt_logprobs: list[TokenLogprob | None] | None) -> None:
        """The prompt goes first in the text; with logprobs its tokens are scored too (the first one is null)."""
        self.text = self._tokenizer.decode(prompt_ids)
        if self.logprobs is not None:
            scores = prompt_logprobs or [None] * len(prompt_ids)
            offset = 0
            for token_id, score in zip(prompt_ids, scores):
                offset = self._add_logprob(self.logprobs, token_id, score, offset)

    def add(self, output: ChoiceOutput) -> None:
        """Take in one engine output; ignored once this choice is done (a stop string ended it early)."""
        if self.done:
            return
        finish_reason = raise_if_failed(output)
        self.num_tokens += len(output.new_token_ids)
        if self.logprobs is not None and output.logprobs:
            offset = self._next_offset(self.logprobs)
            for token_id, score in zip(output.new_token_ids, output.logprobs):
                offset = self._add_logprob(self.logprobs, token_id, score, offset)
        text = self._stop.feed(self._detokenizer.feed(output.new_token_ids))
        if finish_reason is not None and not self.stopped_by_string:
            text += self._stop.feed(self._detokenizer.finish())
            text += "" if self.stopped_by_string else self._stop.flush()
        self.text += text
        if self.stopped_by_string:
            self.finish_reason = "stop"
        elif finish_reason is not None:
            self.finish_reason = finish_reason

    def take_delta(self) -> tuple[str, CompletionLogprobs | None]:
        """Text and logprobs added since the last call, for the next stream chunk."""
        text = self.text[self._sent_chars :]
        self._sent_chars = len(self.text)
        if self.logprobs is None:
            return text, None
        start, self._sent_logprobs = self._sent_logprobs, len(self.logprobs.tokens)
        lp = self.logprobs
        return text, CompletionLogprobs(tokens=lp.tokens[start:], token_logprobs=lp.token_logprobs[start:],
                                        top_logprobs=lp.top_logprobs[start:], text_offset=lp.text_offset[start:])

    def _next_offset(self, lp: CompletionLogprobs) -> int:
        return lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else len(self.text)

    def _add_logprob(self, lp: CompletionLogprobs, token_id: int, score: TokenLogprob | None, offset: int) -> int:
        token = token_text(self._tokenizer, token_id)
        lp.tokens.append(token)
        lp.text_offset.append(offset)
        if score is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
        else:
            lp.token_logprobs.append(score.logprob)
            top = {token_text(self._tokenizer, t): value for t, value in score.top[: self._top_k]}
            lp.top_logprobs.append(top | {token: score.logprob})
        return offset + len(token)
