"""The reply-message framing shared by API and workers."""

import pytest

from workers.protocol import DoneEvent, RouteInfo, encode_event, split_event


def test_round_trip_keeps_payload_bytes() -> None:
    payload = b'{"choices": [{"delta": {"content": "a b  c"}}]}'
    assert split_event(encode_event("job1", "chunk", payload)) == ("job1", "chunk", payload)


def test_structured_event_round_trip() -> None:
    done = DoneEvent(route=RouteInfo(model="m", provider="p", attempts=2), usage={"total_tokens": 3})
    job_id, kind, payload = split_event(encode_event("j", "done", done.model_dump_json().encode()))
    assert (job_id, kind) == ("j", "done")
    assert DoneEvent.model_validate_json(payload) == done


@pytest.mark.parametrize("message", [b"no-spaces", b"job1 bogus {}", b"job1"])
def test_malformed_messages_raise(message: bytes) -> None:
    with pytest.raises(ValueError):
        split_event(message)
