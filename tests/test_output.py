"""The output tracker (engine/output.py) against a slow oracle written from the definitions, with
the real SmolLM2 tokenizer (byte-level BPE) and, for the prompt's context, a SentencePiece-style
one.

The oracle decodes the whole output with transformers' tokenizer after every token:
- text after n tokens: decode(prompt + output[:n]) less decode(prompt);
- a stop string ends the request at the first token n >= min_tokens whose text holds it at a
  place that reaches into what token n added; the text is cut before it (the earliest, then the
  smallest string, where several match);
- the length limit ends it otherwise, and the text flushed then is checked for stops too;
- while it runs, the stream has sent all but the last `longest stop - 1` characters.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from test_tokenizer import sentencepiece_dir  # noqa: F401  (a fixture)
from transformers import AutoTokenizer

from engram_serve.engine.output import OutputTracker
from engram_serve.engine.request import Request, RequestStatus, SamplingParams
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.model.default_model import default_model_dir

TEXT = "The cat sat on the mat. The dog ate food, and the cat slept."
PROMPT = "Tell me a story:"


@pytest.fixture(scope="module")
def smol_dir():
    return default_model_dir(progress=False)


@pytest.fixture(scope="module")
def smol(smol_dir) -> Tokenizer:
    return Tokenizer(smol_dir)


@pytest.fixture(scope="module")
def hf(smol_dir):
    return AutoTokenizer.from_pretrained(smol_dir)


@dataclass
class Run:
    text: str
    finish_reason: str
    stop_reason: str | int | None
    num_tokens: int  # output tokens when it finished
    sent: list[str]  # the text streamed after each token
    outputs: list  # every RequestOutput


def track(tokenizer: Tokenizer, prompt_ids, output_ids, prompt=None, **sampling) -> Run:
    """Feed `output_ids` one at a time, as the engine does, until the tracker finishes it."""
    request = Request(
        "r", list(prompt_ids), SamplingParams(max_tokens=len(output_ids), **sampling),
        prompt=prompt, eos_token_ids=tuple(tokenizer.eos_token_ids), max_total_len=4096,
    )  # fmt: skip
    tracker = OutputTracker(request, tokenizer)
    sent, outputs = [], []
    for token in output_ids:
        finish = tracker.append(token, None)
        if finish is not None:
            request.status = RequestStatus.FINISHED
            request.finish_reason, request.stop_reason = finish
        outputs.append(tracker.output())
        sent.append("".join(o.delta_text for o in outputs))
        if finish is not None:
            return Run(tracker.text, *finish, len(outputs), sent, outputs)
    raise AssertionError("the tracker did not finish at max_tokens")


def oracle(hf, prompt_ids, output_ids, stop=(), min_tokens=0, skip_special_tokens=True) -> Run:
    def text(n: int) -> str:
        whole = hf.decode(prompt_ids + output_ids[:n], skip_special_tokens=skip_special_tokens)
        return whole[len(hf.decode(prompt_ids, skip_special_tokens=skip_special_tokens)) :]

    holdback = max(map(len, stop), default=1) - 1
    sent = []
    for n in range(1, len(output_ids) + 1):
        before, now = text(n - 1), text(n)
        if n >= min_tokens:
            hits = [
                (i, s)
                for s in stop
                for i in range(len(now) - len(s) + 1)
                if now[i : i + len(s)] == s and i + len(s) > len(before)
            ]
            if hits:
                index, s = min(hits)
                return Run(now[:index], "stop", s, n, [*sent, now[:index]], [])
        sent.append(now[: max(0, len(now) - holdback)])
    return Run(now, "length", None, len(output_ids), [*sent[:-1], now], [])


def ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def check(smol, hf, output_ids, prompt_ids=(), **sampling) -> Run:
    got = track(smol, prompt_ids, output_ids, **sampling)
    keys = {k: v for k, v in sampling.items() if k in ("stop", "min_tokens")}
    want = oracle(hf, list(prompt_ids), output_ids, **keys)
    assert (got.text, got.finish_reason, got.stop_reason) == (
        want.text,
        want.finish_reason,
        want.stop_reason,
    )
    assert got.num_tokens == want.num_tokens
    assert got.sent == want.sent
    return got


@pytest.mark.parametrize(
    "stop",
    [
        (),
        ("dog",),  # inside one token
        (" mat. The",),  # across several tokens
        ("The",),  # at the very start of the output
        ("cat", "at"),  # two strings that both match: the earlier one wins
        ("slept.",),  # ends with the last token
        ("zebra",),  # never: the length limit ends it
    ],
)
def test_text_stops_and_stream_follow_the_oracle(smol, hf, stop):
    check(smol, hf, ids(hf, TEXT), ids(hf, PROMPT), stop=stop)


def test_a_stop_string_twice_in_one_token_cuts_at_the_first(smol, hf):
    output = ids(hf, "I feed the bees.")
    assert hf.decode(output[1:2]) == " feed"  # the case is what it says
    assert check(smol, hf, output, stop=("e",)).text == "I f"


@pytest.mark.parametrize("min_tokens", [0, 2, 3, 4, 9])
def test_stop_strings_and_tokens_wait_for_min_tokens(smol, hf, min_tokens):
    """The stop string "cat" completes at token 2 and again near the end: below min_tokens it
    does not stop the request, and once min_tokens is reached the earlier one is not found."""
    output = ids(hf, TEXT)
    assert hf.decode(output[:2]).endswith("cat")
    check(smol, hf, output, stop=("cat",), min_tokens=min_tokens)
    # A stop token: the request ends on it exactly when min_tokens allows.
    token = output[3]
    run = track(smol, [], output, stop_token_ids=(token,), min_tokens=min_tokens)
    ends = [n for n in range(min_tokens, len(output) + 1) if n and output[n - 1] == token]
    want = ("stop", token, ends[0]) if ends else ("length", None, len(output))
    assert (run.finish_reason, run.stop_reason, run.num_tokens) == want


def test_eos_stops_once_min_tokens_is_reached_unless_ignored(smol, hf):
    eos = hf.eos_token_id
    output = [*ids(hf, "One two"), eos, *ids(hf, " three"), eos]
    first = output.index(eos) + 1
    assert track(smol, [], output).num_tokens == first
    assert track(smol, [], output, min_tokens=first).num_tokens == first
    later = track(smol, [], output, min_tokens=first + 1)
    assert (later.finish_reason, later.num_tokens) == ("stop", len(output))
    ignored = track(smol, [], output, ignore_eos=True)
    assert (ignored.finish_reason, ignored.num_tokens) == ("length", len(output))


def test_special_tokens_are_in_the_text_only_when_asked(smol, hf):
    output = [*ids(hf, "Hi"), hf.eos_token_id, *ids(hf, " there")]
    kept = track(smol, [], output, ignore_eos=True, skip_special_tokens=False)
    assert kept.text == hf.decode(output, skip_special_tokens=False)
    assert hf.eos_token in kept.text
    skipped = track(smol, [], output, ignore_eos=True)
    assert skipped.text == hf.decode(output, skip_special_tokens=True) == "Hi there"


def test_a_character_cut_by_the_length_limit_is_flushed_and_checked_for_stops(smol, hf):
    """The last token is the first byte of an emoji: at the length limit the detokenizer's held
    bytes are flushed (as U+FFFD, which a stop string may name)."""
    whole = ids(hf, "ok 😀")
    # The shortest prefix that ends inside the emoji: every earlier token decodes whole.
    output = next(whole[:n] for n in range(1, len(whole)) if hf.decode(whole[:n])[-1] == "\ufffd")
    check(smol, hf, output)
    check(smol, hf, output, stop=("\ufffd",))


def test_the_first_token_takes_its_leading_space_from_the_prompt(sentencepiece_dir):  # noqa: F811
    """SentencePiece drops a leading space at the start of a decode: the prompt's tail is the
    context that keeps it."""
    sp_hf = AutoTokenizer.from_pretrained(sentencepiece_dir)
    prompt, output = ids(sp_hf, "hello"), ids(sp_hf, "hello world")[len(ids(sp_hf, "hello")) :]
    run = track(Tokenizer(sentencepiece_dir), prompt, output)
    assert run.text == oracle(sp_hf, prompt, output).text == " world"


def test_each_output_carries_the_request_and_its_deltas(smol, hf):
    output = ids(hf, TEXT)[:6]
    prompt_ids = ids(hf, PROMPT)
    run = track(smol, prompt_ids, output, prompt=PROMPT)
    for n, out in enumerate(run.outputs, 1):
        assert (out.request_id, out.prompt, out.prompt_token_ids) == ("r", PROMPT, prompt_ids)
        assert out.delta_token_ids == output[n - 1 : n]
        assert out.finished == (n == len(output))
        (completion,) = out.outputs
        assert completion.index == 0 and completion.token_ids == output[:n]
        assert out.metrics is not None and out.metrics.arrival_time > 0
    last = run.outputs[-1].outputs[0]
    assert (last.text, last.finish_reason) == (hf.decode(output), "length")
