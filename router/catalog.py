"""The runtime catalog: which providers are enabled here, their deployments, and lookups."""

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from router.providers.profile import CompiledProfile
from settings.catalog import CatalogFile, Intent, ModelConfig, ProviderConfig

log = logging.getLogger("freeference.catalog")


@dataclass(frozen=True)
class ProviderRuntime:
    config: ProviderConfig
    base_url: str
    api_keys: tuple[str, ...]

    @functools.cached_property
    def profile(self) -> CompiledProfile:
        """The profile's request side, compiled once (router/providers/profile.py)."""
        return CompiledProfile.compile(self.config.profile)

    @property
    def id(self) -> str:
        return self.config.id


@dataclass(frozen=True)
class Deployment:
    """One model served by one provider."""

    model: ModelConfig
    provider: ProviderRuntime

    @property
    def key(self) -> str:
        return f"{self.provider.id}/{self.model.id}"

    def score(self, intent: Intent) -> float:
        return self.model.scores.get(intent, 0.0)


@dataclass
class RuntimeCatalog:
    file: CatalogFile
    providers: dict[str, ProviderRuntime]
    deployments: list[Deployment]
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, file: CatalogFile, environ: Mapping[str, str] | None = None) -> "RuntimeCatalog":
        """Enable each provider whose key (or local URL) is present in the environment."""
        env = os.environ if environ is None else environ
        providers: dict[str, ProviderRuntime] = {}
        skipped: dict[str, str] = {}
        for config in file.providers:
            keys = tuple(env[name] for name in config.api_keys_env if env.get(name))
            url_override = env.get(config.base_url_env) if config.base_url_env else None
            if config.enabled_by_env and not url_override:
                skipped[config.id] = f"{config.base_url_env} is not set"
                continue
            if config.requires_key and not keys:
                skipped[config.id] = f"none of {', '.join(config.api_keys_env)} is set"
                continue
            providers[config.id] = ProviderRuntime(config, (url_override or config.base_url).rstrip("/"), keys)
        deployments = [Deployment(m, providers[m.provider]) for m in file.models if m.provider in providers]
        return cls(file=file, providers=providers, deployments=deployments, skipped=skipped)

    def log_summary(self) -> None:
        for provider_id, why in self.skipped.items():
            log.info("provider %s skipped: %s", provider_id, why)
        log.info("%d providers enabled (%s), %d deployments", len(self.providers),
                 ", ".join(self.providers) or "none", len(self.deployments))

    def intent_of_capability(self, capability: str) -> Intent | None:
        cap = self.file.capabilities.get(capability)
        return cap.intent if cap else None

    def by_model_id(self, model_id: str) -> list[Deployment]:
        return [d for d in self.deployments if d.model.id == model_id]

    def for_intent(self, intent: Intent) -> list[Deployment]:
        """Deployments scored for this intent, best first (stable for equal scores)."""
        scored = [d for d in self.deployments if intent in d.model.scores]
        return sorted(scored, key=lambda d: -d.score(intent))
