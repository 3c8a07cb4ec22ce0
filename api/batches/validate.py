"""Validation of a batch input file: every line checked like a live request, all errors reported.

Runs the same admission code as POST /v1/chat/completions (parse_chat_request, model checks) or
POST /v1/embeddings (check_embeddings), so a line that would be refused live is refused here,
before anything runs.
"""

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from api.dialects.embeddings import check_embeddings, embeddings_job_for
from api.dialects.responses import response_object
from api.dialects.responses_in import input_items, parse_responses_request, to_chat
from api.errors import OpenAIError
from api.jsondepth import nesting_exceeds, too_deep
from api.modelref import check_chat_request, fallbacks, resolve_model
from api.schemas import GATEWAY_FIELDS, parse_chat_request
from settings import Settings
from settings.catalog import CatalogFile
from workers.protocol import BatchLine, ChatJob, Tier

CHAT_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
# The endpoints a batch may run; every line of a batch names its batch's.
BATCH_URLS = (CHAT_URL, RESPONSES_URL, EMBEDDINGS_URL)
# Listing every error of a 50,000-line file would make the batch object huge: keep the first ones.
MAX_REPORTED_ERRORS = 100


@dataclass
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None


@dataclass
class Validated:
    lines: list[BatchLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    def fail(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


@dataclass
class Owner:
    key_id: str
    tier: Tier


def validate_input(content: bytes, owner: Owner, catalog: CatalogFile, settings: Settings,
                   endpoint: str = CHAT_URL) -> Validated:
    """Parse and check every line; `lines` is only meaningful when `error_count` is 0."""
    result = Validated()
    seen: set[str] = set()
    physical = content.split(b"\n")
    if sum(1 for raw in physical if raw.strip()) > settings.batch_max_lines:
        result.fail(LineError("too_many_requests",
                              f"The input file has more than {settings.batch_max_lines:,} requests."))
        return result
    for number, raw in enumerate(physical, start=1):
        if not raw.strip():
            continue
        try:
            line = _check_line(raw, number, seen, owner, catalog, settings, endpoint)
        except _Invalid as exc:
            result.fail(exc.error)
            continue
        result.lines.append(line)
    if not result.lines and not result.error_count:
        result.fail(LineError("empty_file", "The input file contains no requests."))
    return result


class _Invalid(Exception):
    def __init__(self, error: LineError) -> None:
        super().__init__(error.message)
        self.error = error


def _check_line(raw: bytes, number: int, seen: set[str], owner: Owner, catalog: CatalogFile,
                settings: Settings, endpoint: str) -> BatchLine:
    def invalid(code: str, message: str, param: str | None = None) -> _Invalid:
        return _Invalid(LineError(code, message, number, param))

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("invalid_json_line", "This line is not parseable as valid JSON.") from None
    if not isinstance(data, dict):
        raise invalid("invalid_json_line", "Each line must be a JSON object.")
    # The body sits one level below the line: it gets the same bound as a live request's body.
    if nesting_exceeds(data, settings.max_json_depth + 1, raw):
        raise invalid("invalid_request", too_deep(settings.max_json_depth).body.message, "body")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise invalid("missing_required_parameter", "Missing or empty 'custom_id' (a string).", "custom_id")
    if len(custom_id) > 512:
        raise invalid("invalid_request", "'custom_id' is longer than 512 characters.", "custom_id")
    if custom_id in seen:
        raise invalid("duplicate_custom_id", f"The custom_id '{custom_id}' appears more than once.", "custom_id")
    seen.add(custom_id)
    if data.get("method") != "POST":
        raise invalid("invalid_method", "'method' must be 'POST'.", "method")
    if data.get("url") != endpoint:
        raise invalid("invalid_url", f"'url' must be '{endpoint}', the batch's endpoint.", "url")
    body = data.get("body")
    if not isinstance(body, dict):
        raise invalid("invalid_request", "'body' must be a JSON object.", "body")
    try:
        echo = None
        if endpoint == EMBEDDINGS_URL:
            # job/request ids and the deadline are set again for every run of the line.
            job = embeddings_job_for(check_embeddings(body, settings.max_embedding_inputs), owner.key_id, owner.tier,
                                     catalog, uuid.uuid4().hex, "", "", 0)
        elif endpoint == RESPONSES_URL:
            chat, echo = _responses_line(body, settings)
            job = _chat_job(chat, owner, catalog, settings)
        else:
            job = _chat_job(body, owner, catalog, settings)
    except OpenAIError as exc:
        param = f"body.{exc.body.param}" if exc.body.param else "body"
        raise invalid(exc.body.code or "invalid_request", exc.body.message, param) from None
    return BatchLine(custom_id=custom_id, job=job, response_echo=echo)


def _responses_line(body: dict[str, Any], settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the chat body, the `response` object its answer fills in) of a /v1/responses line.

    A line is answered in the output file and not stored (its echo says `store: false`), and
    `previous_response_id` (which reads a stored response) is refused, so a line's meaning never
    depends on when it runs.
    """
    request, data = parse_responses_request(orjson.dumps(body), settings.max_json_depth)
    if request.previous_response_id is not None:
        raise OpenAIError(400, "previous_response_id is not supported in batch lines: send the whole conversation "
                          "as input.", code="invalid_request", param="previous_response_id")
    if request.stream:
        raise OpenAIError(400, "Streaming is not supported in batch requests.", code="invalid_request",
                          param="stream")
    echo = response_object(request.model_copy(update={"store": False}), "", 0, "completed", [], None, None, None)
    return to_chat(request, input_items(data)), echo


def _chat_job(raw: dict[str, Any], owner: Owner, catalog: CatalogFile, settings: Settings) -> ChatJob:
    """The same admission checks and job shape as a live chat request (api/routes/chat.py)."""
    body, raw = parse_chat_request(orjson.dumps(raw), settings.max_json_depth)
    if body.stream:
        raise OpenAIError(400, "Streaming is not supported in batch requests.", code="invalid_request",
                          param="stream")
    check_chat_request(catalog, body, owner.tier, settings.max_messages)
    # job_id, request_id and the deadline are set again for every run of the line.
    return ChatJob(
        job_id=uuid.uuid4().hex, request_id="", reply_channel="",
        body={k: v for k, v in raw.items() if k not in GATEWAY_FIELDS and k != "stream"},
        stream=False, requested_model=resolve_model(catalog, body.model), fallback_models=fallbacks(catalog, body),
        intent_hint=body.route.intent if body.route else None,
        key_id=owner.key_id, tier=owner.tier, deadline_unix_ms=int(time.time() * 1000),
    )
