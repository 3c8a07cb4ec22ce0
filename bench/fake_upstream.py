"""A fast, fault-injecting fake of an OpenAI-compatible provider (real HTTP on loopback).

Used by the tests, the benchmarks and `freeference serve --demo` (where it is the clearly
labelled "simulated" provider). Behaviour per upstream model name is scripted over HTTP:

    POST /_control/script   {"model": M, "faults": [spec, ...]}   one spec per coming request
    POST /_control/default  {"model": M, "fault": spec | null}     every request after the script
    POST /_control/models   {"models": [..] | null}                what GET /v1/models lists (null: 404); an
                                                                   entry is an id or {"id", "context", "free",
                                                                   "tools", "json", "structured", "vision"}
    POST /_control/bad_keys {"keys": [..]}                        Authorization values answered with 401
    POST /_control/rpm      {"model": M, "rpm": N | null,          at most N requests a minute for M (fixed
                             "retry_after": true}                  windows): the rest get 429 (with
                                                                   Retry-After unless false); every answer
                                                                   carries the dialect's rate-limit headers
    POST /_control/reset                                           forget scripts and the log
    GET  /_control/requests                                        every request seen, in order

A fault spec is a dict with any of: status (+ retry_after, retry_after_ms, error_code, message),
reset (drop the connection), silence (never answer), delay_s (before headers),
first_token_delay_s, cut_after (chunks, then drop), stall_after (chunks, then silence),
vectors (embeddings: answer that many vectors),
malformed_after (a garbage line after N chunks), deep_chunk_after (a chunk nested 300 levels
deep after N chunks), no_done (finish without [DONE]),
hold_open (finish without [DONE] and keep the connection open),
context_length (true: a 400 stating an 8192-token window; a number: that window),
context_requested (the tokens it says the request had), content_policy, token_interval_s,
ratelimit_headers (dict),
quota ({"remaining", "limit", "reset_s"}: rate-limit headers in the dialect's names and units),
refuse (field names answered with the dialect's 4xx), huge_body (bytes: a body that size, with
`status`, default 500, and `content_type`, default application/json; "text/event-stream" sends
one endless SSE line), and for errors the dialect's extras: retry_delay and quota_id (gemini),
daily, reset_in_s and raw (openrouter).

Provider dialects (bench/fake_dialects.py): a request under /<dialect>/v1/... (mistral, groq,
cerebras, gemini, cohere, openrouter, github, nousage) is answered in that provider's manner —
the fields it refuses get its 4xx, its errors, rate-limit headers, usage and model listing
have its shape — and the request log records the dialect and any field it would have refused.
"""

import argparse
import asyncio
import time
from collections import defaultdict, deque
from typing import Any

import orjson
import uvicorn

from bench import simulated
from bench.fake_dialects import Dialect, dialect_of, error_body, listing, quota_headers, refusal, refused_fields
from bench.simulated import reply_tokens

__all__ = ["FakeUpstream", "read_body", "reply_tokens"]

Send = Any
Receive = Any
Scope = dict[str, Any]


class FaultInjected(Exception):
    """Raised inside the ASGI app to make the server drop the connection."""


class FakeUpstream:
    def __init__(self, latency_s: float = 0.0, token_interval_s: float = 0.0, default_tokens: int = 16,
                 demo: bool = False) -> None:
        self.latency_s = latency_s
        self.demo = demo  # answer like the demo's simulated model (bench/simulated.py)
        self.token_interval_s = token_interval_s
        self.default_tokens = default_tokens
        self.scripts: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
        self.defaults: dict[str, dict[str, Any]] = {}
        self.models: list[str] | None = None
        self.bad_keys: set[str] = set()
        self.log: list[dict[str, Any]] = []
        self.started = time.time()
        self.rpm: dict[str, int] = {}
        self.rpm_hints: dict[str, bool] = {}  # model → whether its 429s say Retry-After
        # model → (start of its current minute, requests admitted in it)
        self.windows: dict[str, tuple[float, int]] = {}

    def reset(self) -> None:
        self.scripts.clear()
        self.defaults.clear()
        self.models = None
        self.bad_keys.clear()
        self.log.clear()
        self.rpm.clear()
        self.windows.clear()

    def next_fault(self, model: str) -> dict[str, Any]:
        script = self.scripts.get(model)
        if script:
            return script.popleft()
        return self.defaults.get(model) or self.defaults.get("*") or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        dialect, path = dialect_of(scope["path"])
        method = scope["method"]
        body = await read_body(receive)
        if path.endswith("/chat/completions") and method == "POST":
            await self.chat(scope, body, send, receive, dialect)
        elif path.endswith("/embeddings") and method == "POST":
            await self.embeddings(scope, body, send, receive, dialect)
        elif path.endswith("/models") and method == "GET" and not path.startswith("/_control"):
            await self.list_models(send, dialect)
        elif path.startswith("/_control/"):
            await self.control(path, method, body, send)
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    async def list_models(self, send: Send, dialect: Dialect) -> None:
        if self.models is None:  # not scripted: a provider without a listing, which retires nothing
            await _json(send, 404, {"error": {"message": "no model listing", "type": "invalid_request_error"}})
            return
        await _json(send, 200, listing(dialect, self.models))

    async def control(self, path: str, method: str, body: bytes, send: Send) -> None:
        data = orjson.loads(body) if body else {}
        if path == "/_control/script":
            self.scripts[data["model"]].extend(data["faults"])
        elif path == "/_control/default":
            if data.get("fault"):
                self.defaults[data["model"]] = data["fault"]
            else:
                self.defaults.pop(data["model"], None)
        elif path == "/_control/models":
            self.models = data.get("models")
        elif path == "/_control/bad_keys":
            self.bad_keys = {f"Bearer {key}" for key in data.get("keys") or []}
        elif path == "/_control/rpm":
            if data.get("rpm"):
                self.rpm[data["model"]] = int(data["rpm"])
                self.rpm_hints[data["model"]] = bool(data.get("retry_after", True))
            else:
                self.rpm.pop(data["model"], None)
            self.windows.pop(data["model"], None)
        elif path == "/_control/reset":
            self.reset()
        elif path == "/_control/requests":
            await _json(send, 200, {"requests": self.log})
            return
        await _json(send, 200, {"ok": True})

    async def chat(self, scope: Scope, raw: bytes, send: Send, receive: Receive, dialect: Dialect) -> None:
        opened = await self._open(scope, raw, send, receive, dialect, "chat")
        if opened is None:
            return
        body, model, fault = opened
        window_quota = self._quota(model)
        extra_headers = {**(quota_headers(dialect, window_quota) if window_quota else {}),
                         **(quota_headers(dialect, fault["quota"]) if fault.get("quota") else {}),
                         **(fault.get("ratelimit_headers") or {})}
        with_usage = dialect.usage == "always" or (dialect.usage == "asked" and
                                                   bool((body.get("stream_options") or {}).get("include_usage")))
        if body.get("stream"):
            entry = self.log[-1]
            entry["chunks_sent"] = 0
            entry["outcome"] = "streaming"
            await self._stream(send, receive, body, model, fault, extra_headers, entry, with_usage)
        else:
            completion = self._completion(body, model)
            if dialect.usage == "never":
                completion.pop("usage")
            await _json(send, 200, completion, extra_headers)

    async def _open(self, scope: Scope, raw: bytes, send: Send, receive: Receive, dialect: Dialect,
                    endpoint: str) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
        """Log a request and play its fault up to the answer: (body, model, fault) to answer, or
        None when it is answered (an error, a limit, a refusal) or never will be."""
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await _json(send, 400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
            return None
        model = str(body.get("model", ""))
        fault = self.next_fault(model)
        # The dialect's refusals (of chat fields), plus fields a test has it refuse ("refuse": [names]).
        refused = (refused_fields(dialect, body) if endpoint == "chat" else []) + \
            [f for f in fault.get("refuse") or () if f in body]
        self.log.append({"t": time.time(), "model": model, "stream": bool(body.get("stream")), "body": body,
                         "authorization": headers.get("authorization"), "fault": fault, "dialect": dialect.name,
                         "refused": refused, "endpoint": endpoint})
        limited = self._admit(model, dialect)
        if limited is not None:
            self.log[-1]["limited"] = True
            status, payload, limit_headers = limited
            await _json(send, status, payload, limit_headers)
            return None
        if headers.get("authorization") in self.bad_keys:
            await _json(send, 401, {"error": {"message": "Invalid API key", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
            return None
        if refused:
            status, payload = refusal(dialect, refused)
            await _json(send, status, payload)
            return None
        if dialect.token_cap is not None and len(orjson.dumps(body.get("messages") or [])) // 4 > dialect.token_cap:
            message = f"Request body too large for {model} model. Max size: {dialect.token_cap} tokens."
            await _json(send, 413, {"error": {"code": "tokens_limit_reached", "message": message, "details": message}})
            return None
        if fault.get("huge_body"):
            await self._huge(send, receive, fault)
            return None
        delay = fault.get("delay_s", self.latency_s)
        if delay:
            await asyncio.sleep(delay)
        if fault.get("silence"):  # never answer; end when the client gives up
            while (await receive())["type"] != "http.disconnect":
                pass
            return None
        if fault.get("reset"):
            raise FaultInjected("connection reset (injected)")
        if "status" in fault or fault.get("context_length") or fault.get("content_policy"):
            await self._error(send, fault, dialect)
            return None
        return body, model, fault

    async def embeddings(self, scope: Scope, raw: bytes, send: Send, receive: Receive, dialect: Dialect) -> None:
        """Vectors that depend only on the model name and the input (so two providers of one model
        agree, and a test can tell models apart); `dimensions` long, else 8; `vectors` (a number)
        in a fault answers that many instead of one per input."""
        opened = await self._open(scope, raw, send, receive, dialect, "embeddings")
        if opened is None:
            return
        body, model, fault = opened
        value = body.get("input")
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value or [])
        size = int(body.get("dimensions") or 8)
        count = int(fault.get("vectors", len(items)))
        data = [{"object": "embedding", "index": i, "embedding": simulated.vector(model, items[i % len(items)], size)}
                for i in range(count)]
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if dialect.usage != "never":
            tokens = sum(len(item) // 4 + 1 if isinstance(item, str) else len(item) for item in items)
            answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        window_quota = self._quota(model)
        await _json(send, 200, answer, quota_headers(dialect, window_quota) if window_quota else None)

    def _admit(self, model: str, dialect: Dialect) -> tuple[int, Any, dict[str, str]] | None:
        """Count a request against its model's requests-per-minute limit; a 429 answer when over it."""
        limit = self.rpm.get(model)
        if not limit:
            return None
        now = time.time()
        start, used = self.windows.get(model, (now, 0))
        if now - start >= 60:
            start, used = now, 0
        if used >= limit:
            self.windows[model] = (start, used)
            wait_s = max(start + 60 - now, 0.001)
            headers = quota_headers(dialect, {"remaining": 0, "limit": limit, "reset_s": round(wait_s, 2)})
            if self.rpm_hints.get(model, True):
                headers["retry-after"] = str(max(int(wait_s + 0.999), 1))
            return 429, {"error": {"message": f"Rate limit reached for {model}: {limit} requests per minute",
                                   "type": "requests", "code": "rate_limit_exceeded"}}, headers
        self.windows[model] = (start, used + 1)
        return None

    def _quota(self, model: str) -> dict[str, Any] | None:
        """The rate-limit state an answer for `model` reports (None: it has no limit)."""
        limit = self.rpm.get(model)
        if not limit or model not in self.windows:
            return None
        start, used = self.windows[model]
        reset_s = round(max(start + 60 - time.time(), 0), 2)
        return {"remaining": max(limit - used, 0), "limit": limit, "reset_s": reset_s}

    async def _huge(self, send: Send, receive: Receive, fault: dict[str, Any]) -> None:
        """A body of fault["huge_body"] bytes, made as it is sent (the fake never holds it)."""
        remaining = int(fault["huge_body"])
        content_type = str(fault.get("content_type", "application/json"))
        head = b"data: " if content_type == "text/event-stream" else b'{"error": {"message": "'
        await send({"type": "http.response.start", "status": int(fault.get("status", 500)),
                    "headers": [(b"content-type", content_type.encode())]})
        disconnected = asyncio.ensure_future(receive())
        self.log[-1]["outcome"] = "huge_body"
        block = b"x" * (1024 * 1024)
        try:
            await send({"type": "http.response.body", "body": head, "more_body": True})
            while remaining > 0 and not disconnected.done():
                piece = block[:remaining]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                remaining -= len(piece)
                self.log[-1]["bytes_sent"] = int(fault["huge_body"]) - remaining
                await asyncio.sleep(0)  # let a disconnect be seen (a send after it does not wait)
            if not disconnected.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            disconnected.cancel()

    async def _error(self, send: Send, fault: dict[str, Any], dialect: Dialect) -> None:
        headers: dict[str, str] = {}
        if fault.get("context_length"):
            status, code = 400, "context_length_exceeded"
            stated = fault["context_length"] if type(fault["context_length"]) is int else 8192
            message = f"This model's maximum context length is {stated} tokens. Please reduce the length."
            if fault.get("context_requested"):
                message += f" However, you requested {int(fault['context_requested'])} tokens."
        elif fault.get("content_policy"):
            status, code = 400, "content_policy_violation"
            message = "Your request was rejected as a result of our safety system."
        else:
            status = int(fault["status"])
            code = fault.get("error_code", "fake_error")
            message = fault.get("message", f"injected HTTP {status}")
        if "retry_after" in fault:
            headers["retry-after"] = str(fault["retry_after"])
        if "retry_after_ms" in fault:
            headers["retry-after-ms"] = str(fault["retry_after_ms"])
        payload, dialect_headers = error_body(dialect, fault, status, message, code)
        headers.update(dialect_headers)
        if fault.get("quota"):
            headers.update(quota_headers(dialect, fault["quota"]))
        await _json(send, status, payload, headers)

    def _answer(self, body: dict[str, Any], model: str) -> simulated.Answer:
        return simulated.answer(body, model, self.default_tokens, self.demo)

    @staticmethod
    def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
        prompt_tokens = max(1, len(orjson.dumps(body.get("messages", []))) // 4)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _completion(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        answer = self._answer(body, model)
        message: dict[str, Any] = {"role": "assistant", "content": None if answer.tool_call else "".join(answer.pieces)}
        if answer.tool_call:
            message["tool_calls"] = [answer.tool_call]
        choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
                   for i in range(int(body.get("n") or 1))]
        return {"id": simulated.completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices, "usage": self._usage(body, answer.completion_tokens),
                "system_fingerprint": "simulated"}

    async def _stream(self, send: Send, receive: Receive, body: dict[str, Any], model: str, fault: dict[str, Any],
                      extra_headers: dict[str, str], entry: dict[str, Any], with_usage: bool) -> None:
        # The body is read, so the next ASGI message is the client's disconnect (if it leaves).
        disconnected = asyncio.ensure_future(receive())
        try:
            await self._stream_frames(send, disconnected, body, model, fault, extra_headers, entry, with_usage)
        finally:
            disconnected.cancel()

    async def _stream_frames(self, send: Send, disconnected: "asyncio.Future[Any]", body: dict[str, Any], model: str,
                             fault: dict[str, Any], extra_headers: dict[str, str], entry: dict[str, Any],
                             with_usage: bool) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        headers += [(k.encode(), str(v).encode()) for k, v in extra_headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        created = int(time.time())
        stream_id = simulated.completion_id()
        interval = fault.get("token_interval_s", self.token_interval_s)
        first_delay = fault.get("first_token_delay_s", 0)
        if first_delay:
            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
            await asyncio.wait([disconnected], timeout=first_delay)
            if disconnected.done():
                entry["outcome"] = "client_disconnected"
                return

        def frame(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
            chunk: dict[str, Any] = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
                                     "model": model,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices
                                     else []}
            if usage is not None:
                chunk["usage"] = usage
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        answer = self._answer(body, model)
        tool_call = answer.tool_call
        frames: list[bytes] = [frame({"role": "assistant", "content": ""})]
        if tool_call:
            args = tool_call["function"]["arguments"]
            head = {"index": 0, "id": tool_call["id"], "type": "function",
                    "function": {"name": tool_call["function"]["name"], "arguments": ""}}
            frames.append(frame({"tool_calls": [head]}))
            half = len(args) // 2
            for piece in (args[:half], args[half:]):
                frames.append(frame({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        else:
            frames += [frame({"content": tok}) for tok in answer.pieces]
        frames.append(frame({}, answer.finish_reason))
        count = answer.completion_tokens
        if with_usage:
            frames.append(frame({}, usage=self._usage(body, count), choices=False))
        for i, data in enumerate(frames):
            if disconnected.done():
                entry["outcome"] = "client_disconnected"
                return
            if "cut_after" in fault and i >= fault["cut_after"]:
                entry["outcome"] = "cut"
                raise FaultInjected("stream cut (injected)")
            if "stall_after" in fault and i >= fault["stall_after"]:
                entry["outcome"] = "stalled"
                await asyncio.wait([disconnected], timeout=3600)
                return
            if "malformed_after" in fault and i == fault["malformed_after"]:
                await send({"type": "http.response.body", "body": b"data: {not json\n\n", "more_body": True})
            if "deep_chunk_after" in fault and i == fault["deep_chunk_after"]:  # valid JSON, 300 levels deep
                deep = (b'{"choices": [{"index": 0, "delta": {"x": ' + b'{"a": ' * 300 + b"1" + b"}" * 300
                        + b'}, "finish_reason": null}]}')
                await send({"type": "http.response.body", "body": b"data: " + deep + b"\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": data, "more_body": True})
            entry["chunks_sent"] = i + 1
            if interval:
                await asyncio.wait([disconnected], timeout=interval)
        entry["outcome"] = "completed"
        if fault.get("hold_open"):  # the answer is whole but neither [DONE] nor a close follows
            await asyncio.wait([disconnected], timeout=3600)
            return
        tail = b"" if fault.get("no_done") else b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def read_body(receive: Receive) -> bytes:
    """A whole ASGI request body (also used by bench/floor's minimal API)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _json(send: Send, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
    payload = orjson.dumps(data)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream (simulated provider)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--token-interval-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=16, help="length of a text reply without max_tokens")
    parser.add_argument("--demo", action="store_true",
                        help="answer like the demo's simulated model: natural-length replies cut by max_tokens "
                             "(finish_reason length), 'simulated' in generated strings (bench/simulated.py)")
    args = parser.parse_args(argv)
    app = FakeUpstream(args.latency_ms / 1000, args.token_interval_ms / 1000, args.tokens, args.demo)
    uvicorn.run(app, host=args.host, port=args.port, log_level="critical", access_log=False,
                http="httptools", loop="uvloop", lifespan="on", timeout_keep_alive=60,
                # Silent and stalled streams must not hold a shutdown for long.
                timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
