"""Admission checks on the model a caller names (the worker does the actual routing)."""

from fnmatch import fnmatchcase
from typing import Literal

from api.errors import OpenAIError, invalid_request
from api.schemas import ChatCompletionRequest
from settings.catalog import EMBEDDINGS, CatalogFile
from workers.protocol import Tier

AUTO_MODELS = frozenset({"", "auto"})
Endpoint = Literal["chat", "embeddings"]


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


def check_model_reference(catalog: CatalogFile, name: str, tier: Tier, param: str = "model",
                          endpoint: Endpoint = "chat") -> None:
    """404 for unknown names; 400 for a model or capability of the other endpoint (chat vs.
    embeddings); 403 when a free key pins an exact upstream model."""
    capability = catalog.capabilities.get(name)
    if capability is not None:
        if capability.endpoint != endpoint:  # the other of the two endpoints
            raise _other_endpoint(name, "chat" if endpoint == EMBEDDINGS else EMBEDDINGS, param)
        return
    model = next((m for m in catalog.models if m.id == name), None)
    if model is not None:
        if model.embeds != (endpoint == EMBEDDINGS):
            raise _other_endpoint(name, EMBEDDINGS if model.embeds else "chat", param)
        if tier != "pro":
            raise OpenAIError(
                403,
                f"Pinning the exact model '{name}' needs a pro key; use 'auto' or a capability id "
                f"({', '.join(_capability_ids(catalog, endpoint))}).",
                code="tier_not_allowed",
                param=param,
            )
        return
    raise OpenAIError(
        404,
        f"The model '{name}' does not exist. Use 'auto', a capability id "
        f"({', '.join(_capability_ids(catalog, endpoint))}) or an id from GET /v1/models.",
        code="model_not_found",
        param=param,
    )


def _capability_ids(catalog: CatalogFile, endpoint: Endpoint) -> list[str]:
    return sorted(k for k, c in catalog.capabilities.items() if c.endpoint == endpoint)


def _other_endpoint(name: str, serves: Endpoint, param: str) -> OpenAIError:
    path = "/v1/embeddings" if serves == EMBEDDINGS else "/v1/chat/completions"
    kind = "an embedding model" if serves == EMBEDDINGS else "a chat model"
    return OpenAIError(400, f"'{name}' is {kind}: send it to {path}.", code="unsupported_model", param=param)


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
