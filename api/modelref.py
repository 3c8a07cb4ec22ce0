"""Admission checks on the model a caller names (the worker does the actual routing)."""

from fnmatch import fnmatchcase

from api.errors import OpenAIError, invalid_request
from api.schemas import ChatCompletionRequest
from settings.catalog import CatalogFile
from workers.protocol import Tier

AUTO_MODELS = frozenset({"", "auto"})


def normalize_model(name: str | None) -> str | None:
    """None for auto-routing, else the name as given."""
    return None if name is None or name.strip().lower() in AUTO_MODELS else name


def resolve_model(catalog: CatalogFile, name: str | None) -> str | None:
    """The model reference to route by: None for auto, a capability id, an exact model, or (for a
    name the catalog does not know) what the catalog's model_aliases map it to."""
    name = normalize_model(name)
    if name is None or name in catalog.capabilities or any(m.id == name for m in catalog.models):
        return name
    for pattern, target in catalog.model_aliases.items():
        if fnmatchcase(name, pattern):
            return target if target in catalog.capabilities else None
    return name


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


def fallbacks(catalog: CatalogFile, body: ChatCompletionRequest) -> list[str]:
    """The `models` fallbacks as the worker routes them (aliases resolved; "auto": the intent's candidates)."""
    return [resolve_model(catalog, f) or "auto" for f in body.models or []]


def check_chat_request(catalog: CatalogFile, body: ChatCompletionRequest, tier: Tier, max_messages: int) -> None:
    """Admission checks shared by live requests and batch lines: message count, model, fallbacks."""
    if len(body.messages) > max_messages:
        raise invalid_request(f"Too many messages: at most {max_messages}.", param="messages")
    requested = resolve_model(catalog, body.model)
    if requested is not None:
        check_model_reference(catalog, requested, tier)
    for i, fallback in enumerate(body.models or []):
        resolved = resolve_model(catalog, fallback)
        if resolved is not None:
            check_model_reference(catalog, resolved, tier, param=f"models[{i}]")


def pins_exact_model(catalog: CatalogFile, body: ChatCompletionRequest) -> bool:
    """True when the request names an exact upstream model (as `model` or a fallback): pro keys only."""
    exact = {m.id for m in catalog.models}
    names = [resolve_model(catalog, body.model), *(resolve_model(catalog, f) for f in body.models or [])]
    return any(name is not None and name not in catalog.capabilities and name in exact for name in names)
