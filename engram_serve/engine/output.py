"""Turning sampled tokens into text: incremental detokenization, finish checks (EOS, stop tokens,
stop strings, length) and the deltas a stream sends.

A stop string may span several tokens and is never emitted, so while a request runs the last
`longest stop - 1` characters are held back: they may still turn out to start a stop string.
"""

from __future__ import annotations

from engram_serve.engine.request import (
    CompletionOutput,
    Logprob,
    Request,
    RequestOutput,
)
from engram_serve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputTracker:
    """One request's text so far, and what has been sent of it."""

    def __init__(self, request: Request, tokenizer: Tokenizer):
        self.request = request
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, request.sampling.skip_special_tokens
        )
        self.text = ""
        self.num_sent_chars = 0
        self.num_sent_tokens = 0
        stops = request.sampling.stop
        self.holdback = max(map(len, stops)) - 1 if stops else 0

    def append(
        self, token_id: int, logprobs: dict[int, Logprob] | None
    ) -> tuple[str, str | int | None] | None:
        """Add a sampled token. Returns (finish_reason, stop_reason) if the request must stop.
        Below min_tokens nothing but the length limit stops it."""
        request, sampling = self.request, self.request.sampling
        request.output_token_ids.append(token_id)
        if logprobs is not None:
            request.logprobs = (request.logprobs or []) + [logprobs]
        may_stop = request.num_output_tokens >= sampling.min_tokens
        if may_stop and token_id in request.eos_token_ids and not sampling.ignore_eos:
            return "stop", None
        if may_stop and token_id in sampling.stop_token_ids:
            return "stop", token_id
        matched = self._add_text(self.detokenizer.add(token_id), may_stop)
        if matched is not None:
            return "stop", matched
        if request.num_output_tokens >= request.max_output_tokens:
            matched = self._add_text(self.detokenizer.flush(), may_stop)
            return ("length", None) if matched is None else ("stop", matched)
        return None

    def _add_text(self, delta: str, check_stops: bool) -> str | None:
        """Append decoded text; on a stop string, cut the text before it and return it."""
        if not delta:
            return None
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        if not check_stops:
            return None
        hits = [(i, s) for s in self.request.sampling.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        return stop

    def output(self) -> RequestOutput:
        """The request's state, with what changed since the previous call as deltas."""
        request = self.request
        finished = request.is_finished
        sendable = len(self.text) if finished else max(0, len(self.text) - self.holdback)
        sendable = max(sendable, self.num_sent_chars)
        delta_text = self.text[self.num_sent_chars : sendable]
        delta_tokens = request.output_token_ids[self.num_sent_tokens :]
        delta_logprobs = (
            request.logprobs[self.num_sent_tokens :] if request.logprobs is not None else None
        )
        self.num_sent_chars, self.num_sent_tokens = sendable, request.num_output_tokens
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(request.output_token_ids),
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=request.logprobs,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            delta_logprobs=delta_logprobs,
            metrics=request.metrics,
        )
