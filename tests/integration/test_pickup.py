"""How jobs reach workers: the ready list hands each to one worker, arq's queue is the safety net.

These tests enqueue jobs in Redis the way an API process does (api/admission.py, Dispatcher.submit)
and listen on a reply channel of their own, against real worker processes.
"""

import time

import orjson
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis import Redis

from tests.support.processes import FakeUpstream, Gateway
from workers.protocol import (
    ARQ_JOB_FUNCTION,
    ChatJob,
    new_job_id,
    ready_entry,
    ready_list_key,
    reply_channel,
    split_event,
)

pytestmark = pytest.mark.integration

PROCESS = "pickuptest"
QUEUE = "ff:queue"


def _job() -> tuple[ChatJob, bytes]:
    job = ChatJob(job_id=new_job_id(PROCESS), request_id="req_pickup", reply_channel=reply_channel(PROCESS),
                  body={"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 3}, stream=False,
                  requested_model=None, key_id="key_pickup", tier="free",
                  deadline_unix_ms=int((time.time() + 30) * 1000))
    payload = serialize_job(ARQ_JOB_FUNCTION, (job.model_dump(mode="json"),), {}, 1, int(time.time() * 1000),
                            serializer=orjson.dumps)
    return job, payload


def test_a_job_whose_ready_entry_was_lost_is_run_by_the_scan(shared_gateway: Gateway,
                                                              upstream: FakeUpstream) -> None:
    job, payload = _job()
    with Redis.from_url(shared_gateway.redis_url) as redis, redis.pubsub() as pubsub:
        pubsub.subscribe(reply_channel(PROCESS))
        assert pubsub.get_message(timeout=2) is not None  # subscribed before the job is queued
        # On arq's queue, as the API queues it, but without its ready-list entry (a pop lost
        # on the way): only the workers' slow scan can find it.
        redis.set(job_key_prefix + job.job_id, payload, px=60_000)
        redis.zadd(QUEUE, {job.job_id: int(time.time() * 1000)})
        events, started = _collect(pubsub, {job.job_id}, timeout_s=10)
    assert events[job.job_id][0] == "accepted" and events[job.job_id][-1] == "done"
    # Not before the scan's grace (workers/main.py): younger jobs belong to the ready list.
    assert started[job.job_id] >= 0.9
    assert len(upstream.requests()) == 1


def test_every_queued_job_runs_once_whatever_reaches_the_workers_first(shared_gateway: Gateway,
                                                                       upstream: FakeUpstream) -> None:
    jobs = [_job() for _ in range(12)]
    with Redis.from_url(shared_gateway.redis_url) as redis, redis.pubsub() as pubsub:
        pubsub.subscribe(reply_channel(PROCESS))
        assert pubsub.get_message(timeout=2) is not None
        with redis.pipeline(transaction=True) as pipe:
            for job, payload in jobs:
                pipe.set(job_key_prefix + job.job_id, payload, px=60_000)
                pipe.zadd(QUEUE, {job.job_id: int(time.time() * 1000)})
                # Two entries for some jobs (a resubmitted entry, a late duplicate): still one run.
                for _ in range(2 if int(job.job_id[-1], 16) % 2 else 1):
                    pipe.rpush(ready_list_key(QUEUE), ready_entry(job.job_id, payload))
            pipe.execute()
        events, _ = _collect(pubsub, {job.job_id for job, _ in jobs}, timeout_s=15)
        leftovers = redis.exists(*(in_progress_key_prefix + job.job_id for job, _ in jobs))
    for job, _ in jobs:
        assert events[job.job_id].count("done") == 1, events[job.job_id]
        assert events[job.job_id].count("accepted") == 1
    assert len(upstream.requests()) == len(jobs)  # nothing was called upstream twice
    assert leftovers == 0  # every job's keys went with its last event


def _collect(pubsub, job_ids: set[str], timeout_s: float) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Event types per job until every job has its done (or the time is up), and when each was accepted."""
    events: dict[str, list[str]] = {job_id: [] for job_id in job_ids}
    accepted_after_s: dict[str, float] = {}
    began = time.monotonic()
    while time.monotonic() - began < timeout_s and any("done" not in e for e in events.values()):
        message = pubsub.get_message(timeout=0.5)
        if message is None or message["type"] != "message":
            continue
        job_id, event_type, _ = split_event(message["data"])
        if job_id in events:
            events[job_id].append(event_type)
            if event_type == "accepted":
                accepted_after_s[job_id] = time.monotonic() - began
    return events, accepted_after_s
