"""vLLM's `use_beam_search`: the n best continuations by the model's log-probabilities, found as transformers'
`generate(num_beams=n, length_penalty=...)` finds them (its default early stopping).

Like vLLM, the search runs in the front end: each step sends every running beam to the engine as its own
one-token request (the prompt and the beam's tokens, with the 2n likeliest next tokens' raw log-probabilities),
so the prefix cache holds what beams share and a step recomputes only their unshared tails. The 2n best of all
candidates by cumulative log-probability are ranked; those that end (a stop token, or the last of max_tokens)
within the first n are scored `logprob / generated_length ** length_penalty` (the stop token counted) and kept
if they are among the n best ended so far; the first n that do not end run on. The search stops when no
candidate runs on, or, once n have ended, when the best running beam scored at its present length could not
beat the worst of them. The n ended beams come back best first, as the request's choices.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from server.engine.core_client import EngineCoreClient
from server.engine.outputs import ChoiceOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.protocol import MAX_BEAM_WIDTH, APIError, SamplingFields
from server.routes.engine_calls import MergedOutputs, PromptJob, raise_if_failed


@dataclass(slots=True)
class Beam:
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0  # the sum of its tokens' log-probabilities
    scores: list[TokenLogprob] = field(default_factory=list)  # each token's, from the step that chose it


@dataclass(frozen=True, slots=True)
class BeamSettings:
    width: int  # n: beams kept, and choices returned
    length_penalty: float
    stop_token_ids: frozenset[int]  # what ends a beam (under ignore_eos, the client's stop_token_ids only)
    logprobs: int | None  # alternatives reported for each chosen token, as a choice's logprobs; None: none


class BeamSearch:
    """One prompt's search; ``advance`` takes each running beam's step and says whether the search goes on."""

    def __init__(self, settings: BeamSettings, max_tokens: int) -> None:
        self.settings = settings
        self.max_tokens = max_tokens
        self.running = [Beam()] if max_tokens > 0 else []
        self.ended: list[tuple[float, Beam]] = []  # (score, beam), best first, at most width
        self._improvable = True

    def advance(self, tops: list[TokenLogprob]) -> bool:
        width, candidates_kept = self.settings.width, 2 * self.settings.width
        length = len(self.running[0].tokens) + 1
        candidates = sorted(((beam.logprob + logprob, beam, token, top) for beam, top in zip(self.running, tops)
                             for token, logprob in top.top[:candidates_kept]), key=lambda c: -c[0])
        candidates = candidates[:candidates_kept]
        last = length == self.max_tokens
        ends = [last or token in self.settings.stop_token_ids for _, _, token, _ in candidates]
        grown = [self._grown(beam, token, logprob_sum, top) for logprob_sum, beam, token, top in candidates]
        if self._improvable:
            self.ended += [(beam.logprob / length ** self.settings.length_penalty, beam)
                           for beam, end in zip(grown[:width], ends) if end]
            self.ended = sorted(self.ended, key=lambda scored: -scored[0])[:width]
        self.running = [beam for beam, end in zip(grown, ends) if not end][:width]
        if len(self.ended) == width and self.running:
            best_possible = self.running[0].logprob / length ** self.settings.length_penalty
            self._improvable = best_possible > self.ended[-1][0]
        return self._improvable and bool(self.running)

    def _grown(self, beam: Beam, token: int, logprob_sum: float, top: TokenLogprob) -> Beam:
        alternatives = self.settings.logprobs
        chosen = [] if alternatives is None else [
            TokenLogprob(token, logprob_sum - beam.logprob, top.top[:alternatives])]
        return Beam(beam.tokens + [token], logprob_sum, beam.scores + chosen)

    def outputs(self) -> list[ChoiceOutput]:
        """The choices, best first: an ended beam finishes with "stop" if a stop token ended it, else "length".
        Always n of them: where fewer ended (max_tokens 0, a vocabulary smaller than 2n), running and then empty
        beams make up the number."""
        beams = [beam for _, beam in self.ended] + self.running + [Beam()] * self.settings.width
        beams = beams[:self.settings.width]
        outputs = []
        for index, beam in enumerate(beams):
            stopped = bool(beam.tokens) and beam.tokens[-1] in self.settings.stop_token_ids
            outputs.append(ChoiceOutput(index, beam.tokens, beam.scores if self.settings.logprobs is not None
                                        else None, "stop" if stopped else "length",
                                        stop_token_id=beam.tokens[-1] if stopped else None))
        return outputs


class BeamSearchOutputs:
    """MergedOutputs' interface for beam search: every prompt searched at once; each prompt's n choices come
    whole when its search ends (streamed too), prompt logprobs and cache use on each first output."""

    def __init__(self, engine: EngineCoreClient, request_id: str, jobs: list[PromptJob], settings: BeamSettings):
        self.engine = engine
        self._request_id = request_id
        self._jobs = jobs
        self._settings = settings
        self._tasks: list[asyncio.Task[list[ChoiceOutput]]] = []

    async def __aenter__(self) -> BeamSearchOutputs:
        self._tasks = [asyncio.create_task(self._search(i, job)) for i, job in enumerate(self._jobs)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aiter__(self) -> AsyncIterator[tuple[int, ChoiceOutput]]:
        for prompt_index, task in enumerate(self._tasks):
            for output in await task:
                yield prompt_index, output

    def stop_choice(self, prompt_index: int, choice_index: int) -> None:
        """Nothing runs on: a choice comes whole."""

    def choice_finished(self, prompt_index: int) -> None:
        """Nothing runs on: a choice comes whole."""

    async def _search(self, prompt_index: int, job: PromptJob) -> list[ChoiceOutput]:
        search = BeamSearch(self._settings, job.params.max_tokens)
        first: ChoiceOutput | None = None
        # greedy, one token, its 2n likeliest alternatives; the prompt's logprobs only once
        step_params = replace(job.params, max_tokens=1, temperature=0.0, logprobs=2 * search.settings.width,
                              prompt_logprobs=None)
        step_index = 0
        going = bool(search.running)
        while going:
            steps = await asyncio.gather(*(
                self._step(f"{self._request_id}-{prompt_index}-{step_index}-{i}", job.prompt_ids + beam.tokens,
                           replace(step_params, prompt_logprobs=job.params.prompt_logprobs) if step_index == 0
                           else step_params)
                for i, beam in enumerate(search.running)))
            first = first or steps[0][1]
            step_index += 1
            going = search.advance([top for top, _ in steps])
        outputs = search.outputs()
        if first is not None:
            outputs[0].num_cached_tokens = first.num_cached_tokens
        for output in outputs:
            output.num_prompt_tokens = len(job.prompt_ids)
            output.prompt_logprobs = first.prompt_logprobs if first is not None else None
        return outputs

    async def _step(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                    ) -> tuple[TokenLogprob, ChoiceOutput]:
        """One beam's next-token log-probabilities, and the engine's output that carried them."""
        generator = self.engine.generate(request_id, prompt_ids, params, 1)
        try:
            async for output in generator:
                raise_if_failed(output)
                if output.logprobs:
                    return output.logprobs[0], output
        finally:
            await generator.aclose()
        raise RuntimeError(f"the engine gave no token for beam step {request_id}")


def request_outputs(engine: EngineCoreClient, request_id: str, jobs: list[PromptJob],
                    body: SamplingFields) -> MergedOutputs | BeamSearchOutputs:
    """A request's outputs: sampled, or found by beam search."""
    if not body.use_beam_search:
        return MergedOutputs(engine, request_id, jobs, body.n)
    params = jobs[0].params
    settings = BeamSettings(body.n, body.length_penalty, params.ending_token_ids, params.logprobs)
    return BeamSearchOutputs(engine, request_id, jobs, settings)


def check_beam_search(body: SamplingFields) -> None:
    """The document's rule for use_beam_search, as a 400 naming the field: n is the width, and nothing may change
    the model's log-probabilities (penalties, biases, masks, a constraint) or cut the text (stop strings)."""
    if not body.use_beam_search:
        return
    if body.n > MAX_BEAM_WIDTH:
        raise APIError(400, f"n: use_beam_search keeps n beams, at most {MAX_BEAM_WIDTH}", param="n")
    response_format = getattr(body, "response_format", None)
    tool_choice = getattr(body, "tool_choice", None)
    refused = {
        "stop": body.stop not in (None, []),
        "min_tokens": body.min_tokens > 0,
        "logit_bias": bool(body.logit_bias),
        "allowed_token_ids": body.allowed_token_ids is not None,
        "bad_words": bool(body.bad_words),
        "presence_penalty": body.presence_penalty not in (None, 0),
        "frequency_penalty": body.frequency_penalty not in (None, 0),
        "repetition_penalty": body.repetition_penalty not in (None, 1),
        "structured_outputs": body.structured_outputs is not None,
        "response_format": response_format is not None and response_format.type != "text",
        "tool_choice": tool_choice not in (None, "none", "auto"),
    }
    for name, given in refused.items():
        if given:
            raise APIError(400, f"{name}: not with use_beam_search, which ranks whole continuations by the "
                           "model's own log-probabilities", param=name)
