"""The catalog file (YAML): providers, model deployments and capability ids (DESIGN.md §4)."""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Intent = Literal["code", "reasoning", "general"]
INTENTS: tuple[Intent, ...] = ("code", "reasoning", "general")


class CatalogError(ValueError):
    """The catalog file is missing, unreadable or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderTimeouts(_Strict):
    connect_s: float = Field(default=5.0, gt=0)
    first_token_s: float = Field(default=15.0, gt=0)
    idle_s: float = Field(default=20.0, gt=0)
    total_s: float = Field(default=120.0, gt=0)


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


class ModelConfig(_Strict):
    id: str = Field(min_length=1)
    provider: str
    upstream_name: str
    context_window: int = Field(gt=0)
    capabilities: list[str] = Field(default_factory=lambda: ["chat"])
    scores: dict[Intent, float] = Field(default_factory=dict)
    supports_prefill: bool = False
    name: str | None = None
    created: int = 1_735_689_600

    @model_validator(mode="after")
    def _scores_in_range(self) -> "ModelConfig":
        bad = {intent: score for intent, score in self.scores.items() if not 0 <= score <= 1}
        if bad:
            raise ValueError(f"scores must be between 0 and 1, got {bad}")
        return self


class CapabilityConfig(_Strict):
    name: str
    intent: Intent


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
}


class CatalogFile(_Strict):
    providers: list[ProviderConfig]
    models: list[ModelConfig]
    capabilities: dict[str, CapabilityConfig]
    model_aliases: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_MODEL_ALIASES))

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
        return self


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
