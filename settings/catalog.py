"""The catalog file (YAML): providers, model deployments and capability ids (DESIGN.md §4)."""

from collections.abc import Container, Iterable
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Intent = Literal["code", "reasoning", "general"]
INTENTS: tuple[Intent, ...] = ("code", "reasoning", "general")
# The model capability of an embedding model, and of the capability ids served on /v1/embeddings.
EMBEDDINGS: Final = "embeddings"


class CatalogError(ValueError):
    """The catalog file is missing, unreadable or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderTimeouts(_Strict):
    connect_s: float = Field(default=5.0, gt=0)
    first_token_s: float = Field(default=15.0, gt=0)
    idle_s: float = Field(default=20.0, gt=0)
    total_s: float = Field(default=120.0, gt=0)


ErrorDialect = Literal["openai", "openrouter", "gemini", "mistral"]
HeaderDialect = Literal["openai", "groq", "cerebras", "openrouter", "none"]
QuotaScope = Literal["key", "model", "account"]
DailyReset = Literal["utc_midnight", "pacific_midnight"]


class LimitsProfile(_Strict):
    """How a provider reports its limits, and what they apply to."""

    # Which x-ratelimit-* names and units its responses carry (router/providers/limits.py).
    headers: HeaderDialect = "openai"
    # key: one key's quota covers every model; model: each (key, model) has its own; account:
    # the account behind the key shares one quota over its models (a key is taken as its
    # account). The default is the narrowest: a 429 parks no more than the model that said it.
    scope: QuotaScope = "model"
    # When a daily cap says no reset time, it lapses at this midnight.
    daily_reset: DailyReset = "utc_midnight"
    # Requests one worker sends it at once (free tiers often allow only a few per account);
    # more wait in the worker, outside the provider's timeouts (router/providers/slots.py).
    # None: no limit of the gateway's own.
    concurrent_requests: int | None = Field(default=None, gt=0)


class ModelsEndpoint(_Strict):
    """The provider's model listing, and what the catalog refresh learns from it."""

    # Relative to base_url, or absolute (GitHub Models lists its catalog outside /inference).
    url: str = "/models"
    # Add models the provider lists that the catalog does not have (scored by family).
    discover: bool = False
    # Discovery keeps only models the listing prices at zero (OpenRouter's free models).
    free_only: bool = False
    # Discovery keeps only ids matching this glob (e.g. "*:free").
    match: str | None = None
    # Take the context window the listing reports over the catalog's.
    update_context: bool = True
    # The window of a discovered model whose listing reports none (a local server's default).
    default_context_window: int | None = Field(default=None, gt=0)


class ProviderProfile(_Strict):
    """How one provider's OpenAI-compatible API differs from OpenAI's, as data (docs/providers.md)."""

    # Strict providers with a published request schema: only these top-level fields are sent.
    accepts: list[str] | None = None
    # Top-level fields ("logprobs") or message fields ("messages[].name") it answers 4xx for.
    rejects: list[str] = Field(default_factory=list)
    # Fields it knows under another name (Mistral: max_completion_tokens → max_tokens).
    renames: dict[str, str] = Field(default_factory=dict)
    # Whether fields outside OpenAI's schema (vLLM's chat_template_kwargs, OpenRouter's
    # provider) may pass through; strict providers refuse unknown fields with a 4xx.
    extra_fields: bool = True
    # Per role, the message fields it accepts (None: any).
    message_fields: dict[str, list[str]] | None = None
    # Roles it knows under another name (Mistral has no "developer" role: it is its system).
    role_renames: dict[str, str] = Field(default_factory=dict)
    # Whether it takes stream_options (usage on the last chunk); without it the gateway
    # counts tokens itself when the provider sends none.
    stream_options: bool = True
    # The shape of its error bodies (router/providers/dialects/).
    errors: ErrorDialect = "openai"
    limits: LimitsProfile = LimitsProfile()
    models: ModelsEndpoint = ModelsEndpoint()


class ProviderConfig(_Strict):
    id: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    # When set and present in the environment it replaces base_url (local Ollama / vLLM).
    base_url_env: str | None = None
    # Rotation: every variable that is set contributes one key. None set → provider disabled,
    # unless the provider needs no key (local servers, the demo upstream).
    api_keys_env: list[str] = Field(default_factory=list)
    requires_key: bool = True
    # A provider without api keys is only enabled when its base_url_env is set.
    enabled_by_env: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: ProviderTimeouts = ProviderTimeouts()
    # Re-read the provider's /models this often to drop vanished models (0 disables).
    refresh_models_s: float = Field(default=600.0, ge=0)
    # Extra fields on the assistant message that carries a prefill (Mistral wants {prefix: true}).
    prefill_fields: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None
    profile: ProviderProfile = ProviderProfile()


class ModelConfig(_Strict):
    id: str = Field(min_length=1)
    provider: str
    upstream_name: str
    context_window: int = Field(gt=0)
    capabilities: list[str] = Field(default_factory=lambda: ["chat"])
    # Features it is known not to have (its provider's listing says so): "json", "structured_outputs",
    # "tools", "vision". A feature neither listed here nor in capabilities is the router's default
    # for it (router/capabilities.py: JSON output is assumed, tools and images are not).
    lacks: list[str] = Field(default_factory=list)
    scores: dict[Intent, float] = Field(default_factory=dict)
    supports_prefill: bool = False
    name: str | None = None
    created: int = 1_735_689_600
    # Embedding models only (capability "embeddings"): the vector space its vectors live in.
    # Vectors of two spaces cannot be compared, so a request fails over only inside its space:
    # the same model on another provider, or a model declared here to be the same space (a
    # provider's alias of it). None: the model's own id.
    embedding_space: str | None = None

    @property
    def embeds(self) -> bool:
        """An embedding model (served on /v1/embeddings, never routed chat)."""
        return EMBEDDINGS in self.capabilities

    @property
    def space(self) -> str:
        """The vector space of an embedding model (its embedding_space, else its id)."""
        return self.embedding_space or self.id

    @model_validator(mode="after")
    def _scores_in_range(self) -> "ModelConfig":
        bad = {intent: score for intent, score in self.scores.items() if not 0 <= score <= 1}
        if bad:
            raise ValueError(f"scores must be between 0 and 1, got {bad}")
        return self


class CapabilityConfig(_Strict):
    name: str
    # What a chat request sent to this id is routed by (unused for an embeddings capability).
    intent: Intent = "general"
    # "embeddings": an id for /v1/embeddings; it names the first vector space in catalog order
    # that has a deployment (see embedding_capability_space), never a mix of spaces.
    endpoint: Literal["chat", "embeddings"] = "chat"


# Model names clients send on their own (LangChain's and LlamaIndex's OpenAI clients default to
# gpt-3.5-turbo, Codex sends OpenAI model ids, Claude Code sends claude-* ids) → a capability id
# or "auto". The first matching pattern (fnmatch, case-sensitive) wins; a name the catalog knows
# exactly is never aliased. A target capability the catalog lacks means "auto".
DEFAULT_MODEL_ALIASES: dict[str, str] = {
    "gpt-*codex*": "code",
    "codex-*": "code",
    "gpt-*": "auto",
    "chatgpt-*": "auto",
    "o[0-9]*": "reasoning",
    "claude-*": "auto",
    # LangChain's OpenAIEmbeddings and LlamaIndex's OpenAIEmbedding default to OpenAI's names.
    "text-embedding-*": "embedding",
}


class FamilyConfig(_Strict):
    """Scores for a discovered model whose id matches `match` (a glob), first match wins."""

    match: str
    scores: dict[Intent, float]
    capabilities: list[str] = Field(default_factory=list)


class CatalogFile(_Strict):
    providers: list[ProviderConfig]
    models: list[ModelConfig]
    capabilities: dict[str, CapabilityConfig]
    model_aliases: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_MODEL_ALIASES))
    # Conservative scores for models a provider lists that the catalog does not score.
    families: list[FamilyConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "CatalogFile":
        provider_ids = [p.id for p in self.providers]
        if len(set(provider_ids)) != len(provider_ids):
            raise ValueError("provider ids must be unique")
        known = set(provider_ids)
        seen: set[tuple[str, str]] = set()
        for model in self.models:
            if model.provider not in known:
                raise ValueError(f"model {model.id!r} names unknown provider {model.provider!r}")
            if (model.id, model.provider) in seen:
                raise ValueError(f"model {model.id!r} is listed twice for provider {model.provider!r}")
            seen.add((model.id, model.provider))
        clash = {m.id for m in self.models} & set(self.capabilities)
        if clash:
            raise ValueError(f"capability ids clash with model ids: {sorted(clash)}")
        for model in self.models:
            if model.embeds and model.scores:
                raise ValueError(f"model {model.id!r} is an embedding model: it has no chat scores")
        return self

    def embedding_capability(self, name: str | None) -> bool:
        """`name` is a capability id served on /v1/embeddings."""
        capability = self.capabilities.get(name or "")
        return capability is not None and capability.endpoint == EMBEDDINGS

    def chat_capabilities(self) -> dict[str, CapabilityConfig]:
        """The capability ids chat requests may name."""
        return {k: c for k, c in self.capabilities.items() if c.endpoint == "chat"}


def embedding_capability_space(models: Iterable[ModelConfig], deployed: Container[str]) -> str | None:
    """The vector space an embeddings capability id means: that of the first embedding model, in
    catalog order, with a deployment (`deployed`: model ids). Stable while the enabled providers
    are; the answer's `model` names what served, so a store can tell if it ever moves."""
    return next((m.space for m in models if m.embeds and m.id in deployed), None)


def load_catalog(path: Path) -> CatalogFile:
    """Read and validate a catalog file, with an error that names the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path} is not valid YAML: {exc}") from exc
    try:
        return CatalogFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise CatalogError(f"catalog {path} is invalid: {problems}") from exc
