"""What a provider's model listing says, and what the catalog learns from it (docs/providers.md).

Listings come in a few shapes: OpenAI's {"data": [{"id"}]} (Groq adds context_window, vLLM
max_model_len, Mistral max_context_length), OpenRouter's {"data": [...]} with context_length,
supported_parameters, architecture.input_modalities and pricing per model, Gemini's ids
prefixed "models/", and GitHub Models' bare list with supported_input_modalities. One tolerant
reader takes them all; a field a listing lacks is unknown, never guessed.
"""

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from settings.catalog import CatalogFile, FamilyConfig, Intent, ModelConfig, ProviderConfig

_CONTEXT_FIELDS = ("context_length", "context_window", "max_context_length", "max_model_len")


@dataclass(frozen=True)
class ListedModel:
    """One model of a provider's listing, with what the listing says about it (None: not said)."""

    id: str
    name: str | None = None
    context_window: int | None = None
    free: bool | None = None
    tools: bool | None = None
    json: bool | None = None
    structured: bool | None = None
    vision: bool | None = None

    def features(self) -> dict[str, bool]:
        """What the listing says about each feature (router/capabilities.py names), where it says."""
        flags = {"tools": self.tools, "json": self.json, "structured_outputs": self.structured, "vision": self.vision}
        return {name: flag for name, flag in flags.items() if flag is not None}


def parse_listing(payload: bytes) -> list[ListedModel] | None:
    """The models of a listing, or None when the payload is not one."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    items = data.get("data", data.get("models")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        return None
    listed = [model for item in items if isinstance(item, dict) and (model := _model(item)) is not None]
    return listed


def _model(item: Mapping[str, Any]) -> ListedModel | None:
    raw_id = item.get("id") or item.get("name")
    if not isinstance(raw_id, str) or not raw_id:
        return None
    parameters = item.get("supported_parameters")
    params = set(parameters) if isinstance(parameters, list) else None
    modalities = (item.get("architecture") or {}).get("input_modalities") if isinstance(
        item.get("architecture"), dict) else item.get("supported_input_modalities")
    return ListedModel(
        id=raw_id.removeprefix("models/"),
        name=item.get("name") if isinstance(item.get("name"), str) and item.get("id") else None,
        context_window=_context(item),
        free=_free(item.get("pricing")),
        tools=("tools" in params) if params is not None else None,
        json=bool({"response_format", "structured_outputs"} & params) if params is not None else None,
        structured=("structured_outputs" in params) if params is not None else None,
        vision=("image" in modalities) if isinstance(modalities, list) else None,
    )


def _context(item: Mapping[str, Any]) -> int | None:
    for name in _CONTEXT_FIELDS:
        value = item.get(name)
        if isinstance(value, int) and value > 0:
            return value
    top = item.get("top_provider")
    if isinstance(top, dict) and isinstance(top.get("context_length"), int) and top["context_length"] > 0:
        return int(top["context_length"])
    return None


def _free(pricing: Any) -> bool | None:
    if not isinstance(pricing, dict):
        return None
    try:
        return all(float(pricing.get(name, 1)) == 0 for name in ("prompt", "completion"))
    except (TypeError, ValueError):
        return None


def family(model_id: str, families: Iterable[FamilyConfig]) -> FamilyConfig | None:
    """The first family whose glob matches the id (case-insensitive)."""
    lowered = model_id.lower()
    return next((f for f in families if fnmatch.fnmatchcase(lowered, f.match.lower())), None)


@dataclass
class Learned:
    """What one listing taught about one provider: windows to correct, models to add, models gone."""

    provider: str
    listed: set[str] = field(default_factory=set)
    context: dict[str, int] = field(default_factory=dict)  # catalog model id → the listing's window
    # catalog model id → {"capabilities": [...], "lacks": [...]} where the listing reports features
    # the catalog entry does not say (or says otherwise).
    features: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    added: list[ModelConfig] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # catalog model ids the listing no longer has

    def to_json(self) -> bytes:
        """The part every worker applies (context and feature corrections, added models)."""
        return orjson.dumps({"context": self.context, "features": self.features,
                             "added": [m.model_dump(mode="json") for m in self.added]})


def learn(file: CatalogFile, provider: ProviderConfig, listing: list[ListedModel]) -> Learned:
    """Compare a provider's listing with the catalog: corrections, additions (if discovering), vanishings."""
    result = Learned(provider.id, listed={m.id for m in listing})
    configured = [m for m in file.models if m.provider == provider.id]
    by_upstream = {m.id: m for m in listing}
    endpoint = provider.profile.models
    for model in configured:
        seen = by_upstream.get(model.upstream_name)
        if seen is None:
            result.gone.append(model.id)
            continue
        if endpoint.update_context and seen.context_window and seen.context_window != model.context_window:
            result.context[model.id] = seen.context_window
        corrected = with_features(model.capabilities, model.lacks, seen.features())
        if corrected != (model.capabilities, model.lacks):
            result.features[model.id] = {"capabilities": corrected[0], "lacks": corrected[1]}
    if endpoint.discover:
        known = {m.upstream_name for m in configured}
        result.added = [m for item in listing if item.id not in known
                        and (m := discovered(file, provider, item)) is not None]
    return result


def discovered(file: CatalogFile, provider: ProviderConfig, item: ListedModel) -> ModelConfig | None:
    """A catalog entry for a listed model the catalog lacks, or None when it may not be routed."""
    endpoint = provider.profile.models
    if endpoint.free_only and item.free is not True:
        return None
    if item.id in file.capabilities or item.id in ("", "auto"):
        return None  # a name callers use for a capability, not a model
    if endpoint.match and not fnmatch.fnmatchcase(item.id, endpoint.match):
        return None
    window = item.context_window or endpoint.default_context_window
    if not window:
        return None  # without a window nothing can be checked to fit: not routed
    scored = next((m for m in file.models if m.id == item.id), None)  # the same model at another provider
    matched = family(item.id, file.families)
    scores: dict[Intent, float] = dict(scored.scores) if scored else dict(matched.scores) if matched else {}
    if not scores:
        return None  # a guard, an embedding model, or no family: not a chat candidate
    capabilities, lacks = with_features(["chat", *(matched.capabilities if matched else [])], [], item.features())
    return ModelConfig(id=item.id, provider=provider.id, upstream_name=item.id, context_window=window,
                       capabilities=capabilities, lacks=lacks, scores=scores, name=item.name or item.id)


def with_features(capabilities: list[str], lacks: list[str], reported: dict[str, bool]) -> tuple[list[str], list[str]]:
    """(capabilities, lacks) with what a listing reports taking precedence over what was written."""
    has = [c for c in capabilities if reported.get(c, True)] + [f for f, flag in reported.items() if flag]
    lacking = [f for f in lacks if not reported.get(f, False)] + [f for f, flag in reported.items() if not flag]
    return list(dict.fromkeys(has)), list(dict.fromkeys(lacking))
