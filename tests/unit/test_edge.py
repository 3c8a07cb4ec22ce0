"""The edge (api/middleware.py, api/gate.py): key first, then a body read against a cap and a deadline."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fakeredis import FakeAsyncRedis
from fastapi import FastAPI, Request

from api.errors import install_error_handlers
from api.gate import KeyGate
from api.keys import create_key, revoke_key
from api.metrics import CLIENT_LEFT_STATE
from api.middleware import EdgeMiddleware
from settings import Settings

MASTER = "edge-test-master-key-0123"
Message = dict[str, Any]


class Served:
    """What the app behind the edge saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0


def _app(served: Served, redis: FakeAsyncRedis, timeout_s: float = 30.0) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=100, body_timeout_s=timeout_s, body_min_bytes_per_s=1000,
                       max_open_bodies_per_key=2, path_limits={"/v1/files": 1000},
                       admitted_paths=("/v1/chat/completions",))
    app.state.key_gate = KeyGate(redis, Settings(master_key=MASTER))

    @app.post("/v1/files")
    @app.post("/v1/chat/completions")
    async def echo(request: Request) -> dict[str, int]:
        served.calls += 1
        served.bytes = len(await request.body())
        return {"bytes": served.bytes}

    return app


async def _call(app: FastAPI, path: str, headers: dict[str, str], chunks: list[bytes], pause_s: float = 0.0,
                hang_up_after: int | None = None) -> tuple[int, dict[str, str], bytes, dict[str, Any]]:
    """One request through the ASGI app; the body arrives in `chunks`, `pause_s` apart."""
    pending = list(chunks)
    sent: list[Message] = []
    scope: dict[str, Any] = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "http_version": "1.1",
        "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "", "state": {}}
    given = 0

    async def receive() -> Message:
        nonlocal given
        if hang_up_after is not None and given >= hang_up_after:
            return {"type": "http.disconnect"}
        if not pending:
            await asyncio.sleep(3600)  # the caller waits for the answer
        await asyncio.sleep(pause_s)
        given += 1
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start: Message = next((m for m in sent if m["type"] == "http.response.start"), {"status": 0, "headers": []})
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), {k.decode(): v.decode() for k, v in start["headers"]}, body, scope["state"]


Call = Callable[..., Awaitable[tuple[int, dict[str, str], bytes, dict[str, Any]]]]


@pytest.fixture
async def redis() -> FakeAsyncRedis:
    return FakeAsyncRedis()


@pytest.fixture
async def user_key(redis: FakeAsyncRedis) -> str:
    key, _ = await create_key(redis, name="edge", tier="free")
    return key


async def test_upload_path_has_its_own_limit(redis: FakeAsyncRedis) -> None:
    served = Served()
    app = _app(served, redis)
    auth = {"authorization": f"Bearer {MASTER}"}
    status, _, body, _ = await _call(app, "/v1/files", {**auth, "content-length": "900"}, [b"x" * 900])
    assert status == 200 and served.bytes == 900
    status, headers, body, _ = await _call(app, "/v1/files", {**auth, "content-length": "1001"}, [b"x" * 1001])
    assert status == 413 and b"1000 bytes" in body and headers["connection"] == "close"
    status, _, body, _ = await _call(app, "/v1/chat/completions", {**auth, "content-length": "900"}, [b"x" * 900])
    assert status == 413 and b"100 bytes" in body


async def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_cap(redis: FakeAsyncRedis) -> None:
    served = Served()
    status, headers, body, _ = await _call(_app(served, redis), "/v1/chat/completions",
                                           {"authorization": f"Bearer {MASTER}", "transfer-encoding": "chunked"},
                                           [b"x" * 60, b"x" * 60, b"x" * 60])
    assert status == 413 and b'"code":"request_too_large"' in body and headers["connection"] == "close"
    assert served.calls == 1 and served.bytes == 0  # the app was told the caller left, never given the body


@pytest.mark.parametrize("authorization", [None, "Bearer ff-bogus-key", "Basic abc", "Bearer a b"])
async def test_a_bad_key_is_refused_before_a_byte_of_the_body(redis: FakeAsyncRedis, authorization: str | None) -> None:
    served = Served()
    headers = {"content-length": "50"} | ({"authorization": authorization} if authorization else {})
    status, answered, body, _ = await _call(_app(served, redis), "/v1/chat/completions", headers, [],
                                            hang_up_after=0)
    assert status == 401 and b'"code":"invalid_api_key"' in body
    assert answered["connection"] == "close" and served.calls == 0


async def test_a_revoked_key_is_refused_at_the_edge(redis: FakeAsyncRedis, user_key: str) -> None:
    served = Served()
    app = _app(served, redis)
    headers = {"authorization": f"Bearer {user_key}", "content-length": "2"}
    assert (await _call(app, "/v1/files", headers, [b"{}"]))[0] == 200
    await revoke_key(redis, user_key)
    # Routes without an admission script of their own read the record afresh every time.
    assert (await _call(app, "/v1/files", headers, [b"{}"]))[0] == 401
    assert served.calls == 1


async def test_x_api_key_is_accepted(redis: FakeAsyncRedis, user_key: str) -> None:
    served = Served()
    status, *_ = await _call(_app(served, redis), "/v1/files", {"x-api-key": user_key, "content-length": "2"},
                             [b"{}"])
    assert status == 200


async def test_a_slow_body_gets_408_and_a_fair_one_its_time(redis: FakeAsyncRedis) -> None:
    auth = {"authorization": f"Bearer {MASTER}", "transfer-encoding": "chunked"}
    served = Served()
    status, headers, body, _ = await _call(_app(served, redis, timeout_s=0.2), "/v1/files", auth,
                                           [b"x"] * 20, pause_s=0.05)
    assert status == 408 and b'"code":"request_timeout"' in body and headers["connection"] == "close"
    # 0.2 s plus a second per 1,000 bytes: 600 bytes in four 0.1 s steps arrive in time.
    status, *_ = await _call(_app(Served(), redis, timeout_s=0.2), "/v1/files", auth, [b"x" * 150] * 4,
                             pause_s=0.1)
    assert status == 200


async def test_a_caller_that_hangs_up_mid_body_is_a_499_not_an_error(redis: FakeAsyncRedis,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    served = Served()
    status, _, _, state = await _call(_app(served, redis), "/v1/chat/completions",
                                      {"authorization": f"Bearer {MASTER}", "transfer-encoding": "chunked"},
                                      [b"x", b"y"], hang_up_after=1)
    assert state[CLIENT_LEFT_STATE] is True
    assert status in (0, 499)  # nobody reads it; the metrics label it 499
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]


async def test_a_key_may_have_only_so_many_slow_bodies_arriving_at_once(redis: FakeAsyncRedis,
                                                                         user_key: str) -> None:
    app = _app(Served(), redis, timeout_s=0.5)
    slow = {"authorization": f"Bearer {user_key}", "transfer-encoding": "chunked"}
    # Two slow bodies hold the key's two places until they time out; a third slow one is refused.
    first = asyncio.create_task(_call(app, "/v1/files", slow, [b"x"] * 10, pause_s=0.2))
    second = asyncio.create_task(_call(app, "/v1/files", slow, [b"x"] * 10, pause_s=0.2))
    await asyncio.sleep(0.3)
    status, headers, body, _ = await _call(app, "/v1/files", slow, [b"x", b"y"])
    assert status == 429 and b'"code":"rate_limit_exceeded"' in body and headers["retry-after"] == "1"
    # A body that arrives whole in its first read never needs a place: ordinary concurrency is not refused.
    assert (await _call(app, "/v1/files", slow, [b"x"]))[0] == 200
    assert [(await first)[0], (await second)[0]] == [408, 408]
    assert (await _call(app, "/v1/files", slow, [b"x", b"y"]))[0] == 200  # the places are free again
