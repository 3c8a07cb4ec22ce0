"""Typed upstream failures, raised by provider adapters and decided on by the failover policy."""


class UpstreamError(Exception):
    """Base: one attempt on one deployment failed. `reason` is a short metric label."""

    reason = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class RateLimited(UpstreamError):
    """Quota (class d): 429, 402 out of credits, a per-minute token overrun. Waited out at its scope."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None, status: int = 429, daily: bool = False,
                 scope: str | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s
        # A daily (or otherwise long) cap: the key (or key and model) sits out until retry_after_s.
        self.daily = daily
        # "key", "model" or "account" when the answer itself says what the limit covers;
        # None: the provider profile's scope.
        self.scope = scope


class UpstreamServerError(UpstreamError):
    """5xx, connection reset or refused: the route may work again in a moment."""

    reason = "server_error"


class UpstreamConnectError(UpstreamServerError):
    reason = "connect_error"


class UpstreamTimeout(UpstreamError):
    """connect / first-token / idle / total timeout: a silent route, not worth a retry."""

    reason = "timeout"

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class StreamBroken(UpstreamError):
    """The stream was cut or sent garbage before it finished."""

    reason = "stream_broken"


class ContextTooLong(UpstreamError):
    """The request is over the deployment's context window (class a: tried on a larger one first)."""

    reason = "context_length"

    def __init__(self, message: str, *, status: int | None = None, limit_tokens: int | None = None,
                 requested_tokens: int | None = None) -> None:
        super().__init__(message, status=status)
        # The window the provider stated and the tokens it counted for this request, when it says.
        self.limit_tokens = limit_tokens
        self.requested_tokens = requested_tokens


class ContentRejected(UpstreamError):
    """A safety / content-policy refusal: returned to the caller, never routed around."""

    reason = "content_policy"


class NotServable(UpstreamError):
    """Class b: this deployment cannot serve this request (a field or feature it does not take, a
    per-request token cap, no endpoint for tools). The next candidate is tried; nobody cools it."""

    reason = "not_servable"

    def __init__(self, message: str, *, status: int | None = None, feature: str | None = None,
                 limit_tokens: int | None = None, requested_tokens: int | None = None) -> None:
        super().__init__(message, status=status)
        # What it lacks ("logprobs", "tools", "tokens"), remembered so later requests skip it.
        self.feature = feature
        # For "tokens": the per-request cap it stated, and what it counted for this request.
        self.limit_tokens = limit_tokens
        self.requested_tokens = requested_tokens


class RequestRejected(UpstreamError):
    """Any other 4xx caused by the request itself (bad parameter, unsupported field)."""

    reason = "bad_request"


class UpstreamAuthFailed(UpstreamError):
    """401/403: our provider key is bad; that key leaves rotation."""

    reason = "auth"


class ModelUnavailable(UpstreamError):
    """404 or 'model not found': the deployment is gone upstream."""

    reason = "model_unavailable"
