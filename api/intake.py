"""A chat request's way onto the queue: admission and enqueue in one Redis round trip.

Admission (key, limits) and the enqueue used to be two round trips in series, three for a
stream (its open-stream slot): each one the request waited for. For the common case, a user
key and a body that validates, one script does all of it (api/admission.py: the job is queued
only when the key is valid, within its limits, allowed its model and, for a stream, within its
open-stream limit). Anything else takes the separate steps, so errors keep their order (401
and 429 before 400, as before) and a malformed body is charged like any request.
"""

import time
from typing import Any

from arq.constants import job_key_prefix
from fastapi import Request

from api.admission import Admission, JobOnAdmit, estimate_prompt_tokens
from api.auth import bearer_token, is_master_key
from api.backpressure import StreamLimiter
from api.dialects.base import Dialect
from api.dispatch import Dispatcher, JobHandle
from api.errors import OpenAIError
from api.keys import hash_key, key_id_for_digest
from api.modelref import check_chat_request, fallbacks, pins_exact_model, resolve_model
from api.ratelimit import rate_limited
from api.schemas import GATEWAY_FIELDS, ChatCompletionRequest
from settings import Settings
from settings.catalog import CatalogFile
from workers.protocol import ChatJob, Tier, new_job_id, ready_list_key


def build_job(request: Request, key_id: str, tier: Tier | None, body: ChatCompletionRequest, raw: dict[str, Any],
              timeout_s: float, catalog: CatalogFile) -> ChatJob:
    """The job for a validated request (`tier` is None when it is not read yet: see ChatJob)."""
    forwarded = {k: v for k, v in raw.items() if k not in GATEWAY_FIELDS}
    return ChatJob(
        job_id=new_job_id(request.app.state.hub.process_id),
        request_id=request.state.request_id,
        reply_channel=request.app.state.hub.channel,
        body=forwarded,
        stream=bool(body.stream),
        requested_model=resolve_model(catalog, body.model),
        fallback_models=fallbacks(catalog, body),
        intent_hint=body.route.intent if body.route else None,
        key_id=key_id,
        tier=tier,
        deadline_unix_ms=int((time.time() + timeout_s) * 1000),
    )


async def admit_and_enqueue(request: Request, settings: Settings, dispatcher: Dispatcher, catalog: CatalogFile,
                            dialect: Dialect) -> tuple[Admission, JobHandle] | None:
    """Admit and queue the request in one round trip; None when it must take the separate steps.

    Raises 401 / 429 / 403 as admission would. The returned handle is registered for the job's
    events and the job is on the queue.
    """
    token = bearer_token(request)
    if is_master_key(settings, token):
        return None  # no limits to charge: admission costs no round trip
    raw_body = await request.body()
    key_id = key_id_for_digest(hash_key(token))
    try:
        body, raw = await dialect.translate(raw_body, key_id)
        check_chat_request(catalog, body, "pro", settings.max_messages)  # everything but the tier rule
    except OpenAIError:
        return None
    now = time.time()
    estimate = estimate_prompt_tokens(raw_body)
    job = build_job(request, key_id, None, body, raw, settings.request_timeout_s, catalog)
    limiter: StreamLimiter = request.app.state.stream_limiter
    slot = limiter.slot(request, key_id, job)
    payload, ttl_ms, now_ms = dispatcher.serialize(job)
    spec = JobOnAdmit(job_id=job.job_id, job_key=job_key_prefix + job.job_id, queue=settings.queue_name,
                      payload=payload, ttl_ms=ttl_ms, score_ms=now_ms, ready_key=ready_list_key(settings.queue_name),
                      pins_model=pins_exact_model(catalog, body), streams_key=slot[0] if slot else "",
                      streams_limit=limiter.limit, stream_expiry_ms=slot[1] if slot else 0)
    if slot is not None:
        # Release the slot when the response ends, whatever happens from here: if the script ran
        # but its reply was lost, the slot must not stay taken until the deadline. (Releasing a
        # slot the script refused is a no-op.)
        limiter.granted(request, slot[0], job.job_id)
    handle = await dispatcher.register(job, payload)
    try:
        record, decision, outcome = await request.app.state.gatekeeper.admit_and_enqueue(token, estimate, spec, now)
    except BaseException:
        dispatcher.abandon(handle)
        raise
    admission = Admission(record, decision, estimate, now)
    if outcome != "queued":
        dispatcher.abandon(handle)
        if not decision.allowed:
            raise rate_limited(decision)
        error = limiter.refusal() if outcome == "streams" else _tier_refusal(catalog, body, record.tier, settings)
        error.headers = {**admission.headers, **error.headers}
        raise error
    dispatcher.enqueued()
    return admission, handle


def _tier_refusal(catalog: CatalogFile, body: ChatCompletionRequest, tier: Tier, settings: Settings) -> OpenAIError:
    try:
        check_chat_request(catalog, body, tier, settings.max_messages)
    except OpenAIError as exc:
        return exc
    return OpenAIError(403, "This key's tier may not pin exact models.", code="tier_not_allowed")
