"""Bearer-key authentication for /v1 and /admin.

User keys are never compared as strings: a presented key is hashed (sha256) and the hash is
looked up as a Redis key name, so response time does not depend on how much of a guess
matches. The master key is the one secret compared directly, with hmac.compare_digest.
"""

import hashlib
import hmac

from fastapi import Request
from starlette.datastructures import Headers

from api.errors import OpenAIError
from api.keys import KeyRecord, lookup_key
from settings import Settings

MASTER_RECORD = KeyRecord(id="master", name="master", tier="pro", created=0, kind="master")
# Where the edge (api/gate.py) leaves the record it read, so the route does not read it again.
KEY_RECORD_STATE = "ff_key_record"


def unauthorized(message: str) -> OpenAIError:
    """The 401 every authentication failure gets."""
    return OpenAIError(
        401, message, code="invalid_api_key", type_="invalid_request_error",
        headers={"WWW-Authenticate": "Bearer"},
    )


def presented_key(headers: Headers) -> str:
    """The key of 'Authorization: Bearer <key>' (or of 'x-api-key', as Anthropic's clients send it).

    401 when neither is there or the Authorization header is malformed.
    """
    header = headers.get("authorization")
    if not header:
        token = headers.get("x-api-key", "").strip()
        if token and " " not in token:
            return token
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer ff-…'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise unauthorized("Malformed Authorization header; expected 'Bearer <key>'.")
    return token


def bearer_token(request: Request) -> str:
    """The request's key (presented_key); 401 when missing or malformed."""
    return presented_key(request.headers)


def is_master_key(settings: Settings, token: str) -> bool:
    """Constant-time comparison with the configured master key (False when none is set)."""
    if settings.master_key is None:
        return False
    # Digests of both sides have equal length, so not even the master key's length leaks
    # (compare_digest returns at once on a length mismatch).
    presented = hashlib.sha256(token.encode()).digest()
    expected = hashlib.sha256(settings.master_key.get_secret_value().encode()).digest()
    return hmac.compare_digest(presented, expected)


async def authenticate(request: Request, settings: Settings) -> KeyRecord:
    """The caller's key record; 401 for missing, malformed, unknown or revoked keys."""
    checked: KeyRecord | None = request.scope.get("state", {}).get(KEY_RECORD_STATE)
    if checked is not None:
        return checked  # read by the edge for this very request
    token = bearer_token(request)
    if is_master_key(settings, token):
        return MASTER_RECORD
    record = await lookup_key(request.app.state.redis, token)
    if record is None or record.revoked:
        # Same message for both: do not tell an attacker which keys once existed.
        raise unauthorized("Incorrect API key provided.")
    return record


async def require_master(request: Request, settings: Settings) -> None:
    """/admin guard: 401 without a valid key, 403 with a valid key that is not the master key."""
    record = await authenticate(request, settings)
    if record.kind != "master":
        raise OpenAIError(403, "This endpoint needs the master key.", code="admin_only")
