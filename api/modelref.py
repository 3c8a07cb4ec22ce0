"""Admission checks on the model a caller names (the worker does the actual routing)."""

from api.errors import OpenAIError, invalid_request
from api.schemas import ChatCompletionRequest
from settings.catalog import CatalogFile
from workers.protocol import Tier

AUTO_MODELS = frozenset({"", "auto"})


def normalize_model(name: str | None) -> str | None:
    """None for auto-routing, else the name as given."""
    return None if name is None or name.strip().lower() in AUTO_MODELS else name


def check_model_reference(catalog: CatalogFile, name: str, tier: Tier, param: str = "model") -> None:
    """404 for unknown names; 403 when a free key pins an exact upstream model."""
    if name in catalog.capabilities:
        return
    if any(m.id == name for m in catalog.models):
        if tier != "pro":
            raise OpenAIError(
                403,
                f"Pinning the exact model '{name}' needs a pro key; use 'auto' or a capability id "
                f"({', '.join(sorted(catalog.capabilities))}).",
                code="tier_not_allowed",
                param=param,
            )
        return
    raise OpenAIError(
        404,
        f"The model '{name}' does not exist. Use 'auto', a capability id "
        f"({', '.join(sorted(catalog.capabilities))}) or an id from GET /v1/models.",
        code="model_not_found",
        param=param,
    )


def check_chat_request(catalog: CatalogFile, body: ChatCompletionRequest, tier: Tier, max_messages: int) -> None:
    """Admission checks shared by live requests and batch lines: message count, model, fallbacks."""
    if len(body.messages) > max_messages:
        raise invalid_request(f"Too many messages: at most {max_messages}.", param="messages")
    requested = normalize_model(body.model)
    if requested is not None:
        check_model_reference(catalog, requested, tier)
    for i, fallback in enumerate(body.models or []):
        if normalize_model(fallback) is not None:
            check_model_reference(catalog, fallback, tier, param=f"models[{i}]")


def pins_exact_model(catalog: CatalogFile, body: ChatCompletionRequest) -> bool:
    """True when the request names an exact upstream model (as `model` or a fallback): pro keys only."""
    exact = {m.id for m in catalog.models}
    names = [normalize_model(body.model), *(normalize_model(f) for f in body.models or [])]
    return any(name is not None and name not in catalog.capabilities and name in exact for name in names)
