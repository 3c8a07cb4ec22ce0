"""What the API and worker processes of every variant share: the Redis framing and the SSE assembler."""

import orjson

JOBS = b"jobs"  # the one list every API pushes to and every worker claims from with BLPOP
UPSTREAM_PATH = "/v1/chat/completions"
ID_LEN = 16  # job ids are 16 hex digits, so a reply is split without a parser

# A job:   reply channel, "\n", job id, b"1" (stream) or b"0", the client's request body.
# A reply: job id, one kind byte, payload. Kinds: b"r" whole chat.completion, b"c" one SSE event,
#          b"e" the last SSE event (data: [DONE]).


def encode_job(channel: bytes, job_id: bytes, stream: bool, body: bytes) -> bytes:
    return channel + b"\n" + job_id + (b"1" if stream else b"0") + body


def decode_job(job: bytes) -> tuple[bytes, bytes, bool, bytes]:
    """-> (reply channel, job id, stream, body for the upstream). The upstream is always asked to stream."""
    nl = job.index(b"\n")
    flag = nl + 1 + ID_LEN
    request = orjson.loads(job[flag + 1 :])
    request["stream"] = True
    return job[:nl], job[nl + 1 : flag], job[flag : flag + 1] == b"1", orjson.dumps(request)


def decode_reply(reply: bytes) -> tuple[bytes, bytes, bytes]:
    """-> (job id, kind byte, payload)."""
    return reply[:ID_LEN], reply[ID_LEN : ID_LEN + 1], reply[ID_LEN + 1 :]


def assemble(events: list[bytes]) -> bytes:
    """SSE event payloads (the bytes after "data: ") -> one chat.completion JSON document."""
    parts: list[str] = []
    finish = usage = first = None
    for event in events:
        chunk = orjson.loads(event)
        first = first or chunk
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                parts.append(delta["content"])
            finish = choice.get("finish_reason") or finish
    if first is None:
        raise ValueError("upstream stream without events")
    out = {"id": first["id"], "object": "chat.completion", "created": first["created"], "model": first["model"],
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                        "finish_reason": finish}]}
    if usage:
        out["usage"] = usage
    return orjson.dumps(out)
