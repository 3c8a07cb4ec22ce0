"""Bearer-key authentication for /v1 and /admin."""

import hmac

from fastapi import Request

from api.errors import OpenAIError
from api.keys import KeyRecord, lookup_key
from settings import Settings

MASTER_RECORD = KeyRecord(id="master", name="master", tier="pro", created=0, kind="master")


def _unauthorized(message: str) -> OpenAIError:
    return OpenAIError(
        401, message, code="invalid_api_key", type_="invalid_request_error",
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer ff-…'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _unauthorized("Malformed Authorization header; expected 'Bearer <key>'.")
    return token


def is_master_key(settings: Settings, token: str) -> bool:
    if settings.master_key is None:
        return False
    return hmac.compare_digest(token.encode(), settings.master_key.get_secret_value().encode())


async def authenticate(request: Request, settings: Settings) -> KeyRecord:
    """The caller's key record; 401 for missing, malformed, unknown or revoked keys."""
    token = bearer_token(request)
    if is_master_key(settings, token):
        return MASTER_RECORD
    record = await lookup_key(request.app.state.redis, token)
    if record is None or record.revoked:
        # Same message for both: do not tell an attacker which keys once existed.
        raise _unauthorized("Incorrect API key provided.")
    return record
