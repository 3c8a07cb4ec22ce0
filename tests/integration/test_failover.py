"""Every row of the DESIGN.md §5 policy, end to end: openai SDK → API → Redis → 2 workers → fake upstream.

Each test asserts what the caller received and what the upstream saw (attempts per model and
their timing, from the fake's request log).
"""

from collections.abc import Callable, Iterator

import openai
import pytest

from bench.fake_upstream import reply_tokens
from tests.integration.test_failover_support import (
    FAST_ENV,
    KEY_1,
    KEY_2,
    MESSAGES,
    ask,
    failover_catalog,
    forget_health,
)
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

BEST, BACKUP, SMALL = "general-best", "general-backup", "general-small"


def expected(model: str, max_tokens: int = 8) -> str:
    return "".join(reply_tokens(model, max_tokens))


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    return module_gateway_factory(workers=2, catalog=failover_catalog(fake_upstream.url), **FAST_ENV)


@pytest.fixture
def key(gateway: Gateway, upstream: FakeUpstream) -> Iterator[str]:
    forget_health(gateway)
    yield gateway.create_key("free")


def times(upstream: FakeUpstream, model: str) -> list[float]:
    return [r["t"] for r in upstream.requests(model)]


@pytest.mark.parametrize("stream", [False, True])
def test_short_retry_after_is_waited_exactly_then_same_model(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                             stream: bool) -> None:
    upstream.script(BEST, {"status": 429, "retry_after": 1})
    answer = ask(gateway, key, stream)
    assert answer.content == expected(BEST)
    assert answer.model == BEST
    assert answer.headers["x-freeference-attempts"] == "2"
    t = times(upstream, BEST)
    assert len(t) == 2
    assert t[1] - t[0] >= 1.0  # never sooner than asked
    assert t[1] - t[0] < 5.0
    assert upstream.requests(BACKUP) == []


@pytest.mark.parametrize("stream", [False, True])
def test_long_retry_after_fails_over_at_once_and_parks_that_key(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                                stream: bool) -> None:
    upstream.script(BEST, {"status": 429, "retry_after": 120})
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BACKUP), BACKUP)
    assert answer.headers["x-freeference-provider"] == "fake-b"
    assert answer.headers["x-freeference-attempts"] == "2"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert len(upstream.requests(BEST)) == 1
    assert upstream.requests(BACKUP)[0]["t"] - upstream.requests(BEST)[0]["t"] < 2.0  # no wait
    # The 429 was about that key's quota: every later request (on either worker) leaves that key
    # out, and the provider's other key still serves the primary.
    parked = upstream.requests(BEST)[0]["authorization"]
    for _ in range(3):
        again = ask(gateway, key, stream)
        assert again.model == BEST and again.headers["x-freeference-attempts"] == "1"
    assert parked not in [r["authorization"] for r in upstream.requests(BEST)[1:]]
    # With both keys parked the primary is skipped before it is tried.
    upstream.script(BEST, {"status": 429, "retry_after": 120})
    assert ask(gateway, key, stream).model == BACKUP
    assert ask(gateway, key, stream).model == BACKUP
    assert len(upstream.requests(BEST)) == 5


@pytest.mark.parametrize("stream", [False, True])
def test_429_without_retry_after_backs_off_once_then_fails_over(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                                 stream: bool) -> None:
    upstream.script(BEST, {"status": 429}, {"status": 429})
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BACKUP), BACKUP)
    t = times(upstream, BEST)
    assert len(t) == 2
    assert t[1] - t[0] >= 0.2  # jittered backoff with a floor: never a tight loop
    assert len(upstream.requests(BACKUP)) == 1
    assert ask(gateway, key, stream).model == BACKUP  # cooling down
    assert len(upstream.requests(BEST)) == 2


@pytest.mark.parametrize("fault", [{"status": 503}, {"status": 500}, {"reset": True}], ids=["503", "500", "reset"])
@pytest.mark.parametrize("stream", [False, True])
def test_server_error_one_quick_retry_then_failover(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                    stream: bool, fault: dict) -> None:
    upstream.script(BEST, fault, fault)
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BACKUP), BACKUP)
    assert answer.headers["x-freeference-attempts"] == "3"
    t = times(upstream, BEST)
    assert len(t) == 2
    assert 0.1 <= t[1] - t[0] < 3.0
    assert len(upstream.requests(BACKUP)) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_server_error_once_is_retried_on_the_same_model(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                        stream: bool) -> None:
    upstream.script(BEST, {"status": 502})
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BEST), BEST)
    assert answer.headers["x-freeference-attempts"] == "2"
    assert upstream.requests(BACKUP) == []


@pytest.mark.parametrize("stream", [False, True])
def test_connection_refused_is_retried_once_then_fails_over(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                            stream: bool) -> None:
    answer = ask(gateway, key, stream, model="code")
    assert (answer.content, answer.model) == (expected("coder"), "coder")
    assert answer.headers["x-freeference-attempts"] == "3"  # refused, refused again after a backoff, coder
    assert answer.elapsed_s < 5
    assert [r["model"] for r in upstream.requests()] == ["coder"]


@pytest.mark.parametrize("fault", [{"silence": True}, {"first_token_delay_s": 30}], ids=["no-headers", "first-token"])
@pytest.mark.parametrize("stream", [False, True])
def test_timeouts_fail_over_without_retrying_the_silent_route(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                              stream: bool, fault: dict) -> None:
    upstream.script(BEST, fault)
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BACKUP), BACKUP)
    assert len(upstream.requests(BEST)) == 1
    assert len(upstream.requests(BACKUP)) == 1
    assert answer.elapsed_s < 8  # first_token_s is 1.5: one wait, not several


def test_idle_stall_of_a_non_streaming_answer_restarts_elsewhere(gateway: Gateway, upstream: FakeUpstream,
                                                                 key: str) -> None:
    upstream.script(BEST, {"stall_after": 3})
    answer = ask(gateway, key, stream=False)
    # Nothing reached the caller, so the answer is the backup's whole answer, not a continuation.
    assert (answer.content, answer.model) == (expected(BACKUP), BACKUP)
    assert len(upstream.requests(BEST)) == 1
    assert upstream.requests(BACKUP)[0]["body"]["messages"] == MESSAGES


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_400_goes_only_to_larger_models(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                       stream: bool) -> None:
    upstream.script(BEST, {"context_length": 8192})
    answer = ask(gateway, key, stream)
    assert answer.model == BACKUP
    upstream.script(BEST, {"context_length": 8192})
    upstream.script(BACKUP, {"context_length": 32768})
    with pytest.raises(openai.BadRequestError) as info:
        ask(gateway, key, stream)
    assert info.value.code == "context_length_exceeded"
    assert upstream.requests(SMALL) == []  # 4k < 8k: never tried after an 8k model said too long
    assert upstream.requests("coder") == []  # 16k < 32k: the same


def test_prompt_longer_than_a_window_skips_that_model_before_trying(gateway: Gateway, upstream: FakeUpstream,
                                                                    key: str) -> None:
    long_prompt = [{"role": "user", "content": "word " * 12_000}]  # ~15k tokens: only the 32k model fits
    answer = ask(gateway, key, stream=False, messages=long_prompt)
    assert answer.model == BACKUP and answer.headers["x-freeference-attempts"] == "1"
    assert upstream.requests(BEST) == [] and upstream.requests(SMALL) == []
    huge = [{"role": "user", "content": "word " * 40_000}]  # ~50k tokens: nothing fits
    with pytest.raises(openai.BadRequestError) as info:
        ask(gateway, key, stream=True, messages=huge)
    assert info.value.code == "context_length_exceeded"
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_content_policy_is_returned_not_routed_around(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                      stream: bool) -> None:
    upstream.script(BEST, {"content_policy": True})
    with pytest.raises(openai.BadRequestError) as info:
        ask(gateway, key, stream)
    assert info.value.code == "content_policy_violation"
    assert "safety system" in info.value.message  # the provider's reason
    assert len(upstream.requests()) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_401_takes_the_key_out_of_rotation(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                    stream: bool) -> None:
    upstream.set_bad_keys([KEY_1])
    answers = [ask(gateway, key, stream) for _ in range(5)]
    assert all(a.content in (expected(BEST), expected(BACKUP)) for a in answers)
    used = [r["authorization"] for r in upstream.requests(BEST)]
    assert used.count(f"Bearer {KEY_1}") <= 1  # refused once, then never tried again
    assert used.count(f"Bearer {KEY_2}") >= 4
    assert sum(a.model == BEST for a in answers) >= 4


def test_exhausted_key_is_skipped_before_it_is_tried(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "100",
             "x-ratelimit-reset-requests": "10m"}
    upstream.set_default(BEST, {"ratelimit_headers": spent})
    for _ in range(2):
        assert ask(gateway, key, stream=False).model == BEST
    # Each answer exhausted the key it used; with both keys spent the model is skipped.
    assert ask(gateway, key, stream=True).model == BACKUP
    used = [r["authorization"] for r in upstream.requests(BEST)]
    assert sorted(set(used)) == sorted({f"Bearer {KEY_1}", f"Bearer {KEY_2}"})
    assert len(used) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_chunk_is_skipped(gateway: Gateway, upstream: FakeUpstream, key: str, stream: bool) -> None:
    upstream.script(BEST, {"malformed_after": 3})
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BEST), BEST)
    assert answer.headers["x-freeference-attempts"] == "1"


@pytest.mark.parametrize("stream", [False, True])
def test_cut_before_any_chunk_fails_over_invisibly(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                   stream: bool) -> None:
    upstream.script(BEST, {"cut_after": 0})
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model, answer.finish_reason) == (expected(BACKUP), BACKUP, "stop")
    assert len(upstream.requests(BEST)) == 1


@pytest.mark.parametrize("fault", [{"cut_after": 4}, {"stall_after": 4}], ids=["cut", "stall"])
def test_stream_broken_after_chunks_continues_on_a_prefill_model(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                                 fault: dict) -> None:
    upstream.script(BEST, fault)
    answer = ask(gateway, key, stream=True, max_tokens=8)
    sent = "".join(reply_tokens(BEST, 8)[:3])  # role chunk + 3 tokens reached the caller
    assert answer.content == sent + "".join(f" cont{i}" for i in range(1, 6))
    assert answer.finish_reason == "stop"
    assert len({c.id for c in answer.chunks}) == 1  # one stream for the caller
    continued = upstream.requests(BACKUP)[0]["body"]
    assert continued["messages"] == [*MESSAGES, {"role": "assistant", "content": sent}]
    assert continued["max_tokens"] == 5


def test_stream_broken_after_chunks_without_an_eligible_model_ends_in_band(gateway: Gateway, upstream: FakeUpstream,
                                                                           key: str) -> None:
    upstream.script(BEST, {"cut_after": 4})
    upstream.script(BACKUP, {"status": 500})
    client = gateway.client(key)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=8, stream=True):
            received.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "".join(
        reply_tokens(BEST, 8)[:3])
    assert "upstream" in str(info.value.message).lower()
    assert upstream.requests(SMALL) == []  # no prefill support: not eligible to continue


def test_non_streaming_never_returns_a_truncated_answer(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    upstream.script(BEST, {"cut_after": 4})
    upstream.script(BACKUP, {"cut_after": 2})
    answer = ask(gateway, key, stream=False)
    assert (answer.content, answer.model, answer.finish_reason) == (expected(SMALL), SMALL, "stop")


@pytest.mark.parametrize("fault", [{"no_done": True}, {"hold_open": True}], ids=["closed", "held-open"])
@pytest.mark.parametrize("stream", [False, True])
def test_missing_done_finalizes_at_once_with_usage(gateway: Gateway, upstream: FakeUpstream, key: str, stream: bool,
                                                   fault: dict) -> None:
    upstream.script(BEST, fault)
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BEST), BEST)
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.elapsed_s < 3.0  # not the 4 s idle timeout
    assert answer.headers["x-freeference-attempts"] == "1"


def test_everything_cooling_is_503_with_retry_after_then_502_names_attempts(gateway: Gateway,
                                                                            upstream: FakeUpstream, key: str) -> None:
    for model in (BEST, BACKUP, SMALL, "coder"):
        upstream.script(model, {"status": 429, "retry_after": 60})
    with pytest.raises(openai.APIStatusError) as failed:
        ask(gateway, key, stream=False)
    assert failed.value.status_code == 502
    assert failed.value.code == "upstream_failed"
    assert "All 4 upstream attempts failed" in failed.value.message
    assert "fake-a" in failed.value.message and "fake-b" in failed.value.message
    with pytest.raises(openai.APIStatusError) as cooling:
        ask(gateway, key, stream=True)
    assert cooling.value.status_code == 503
    assert cooling.value.code == "no_models_available"
    assert 50 <= int(cooling.value.response.headers["retry-after"]) <= 60
    assert len(upstream.requests()) == 4


@pytest.mark.parametrize("stream", [False, True])
def test_everything_cooling_briefly_is_waited_for_not_503(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                          stream: bool) -> None:
    # A Retry-After of 3 s is too long to wait on one model (short max is 2 s), so the first
    # caller fails over through all four and gets a 502; the next caller finds every model
    # cooling for about 3 s, which is within the availability wait: it waits and is served.
    for model in (BEST, BACKUP, SMALL, "coder"):
        upstream.script(model, {"status": 429, "retry_after": 3})
    with pytest.raises(openai.APIStatusError) as failed:
        ask(gateway, key, stream=False)
    assert failed.value.status_code == 502
    answer = ask(gateway, key, stream)
    assert (answer.content, answer.model) == (expected(BEST), BEST)
    best = upstream.requests(BEST)
    assert len(best) == 2 and best[1]["t"] - best[0]["t"] >= 3.0  # never before the Retry-After
    assert len(upstream.requests()) == 5


def test_explicit_fallbacks_are_tried_in_order(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    pro = gateway.create_key("pro")
    upstream.script(SMALL, {"status": 400, "context_length": True})
    answer = ask(gateway, pro, stream=False, model=SMALL, extra_body={"models": ["coder", BEST]})
    assert answer.model == "coder"
    assert [r["model"] for r in upstream.requests()] == [SMALL, "coder"]
