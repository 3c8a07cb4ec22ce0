"""The runtime catalog: which providers are enabled here, their deployments, and lookups."""

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

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

    @functools.cached_property
    def key(self) -> str:
        """"provider/model": the name its shared health and every route note go by (computed once:
        ranking reads it many times per request)."""
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

    def apply_learned(self, learned: Mapping[str, Mapping[str, Any]]) -> bool:
        """Rebuild the deployments from the file plus what provider listings taught (provider →
        {"context": {model id: window}, "features": {model id: {"capabilities", "lacks"}},
        "added": [model]}); True when they changed.

        The list is replaced in place: holders of `deployments` see the new one.
        """
        deployments: list[Deployment] = []
        for model in self.file.models:
            provider = self.providers.get(model.provider)
            if provider is None:
                continue
            taught = learned.get(model.provider) or {}
            window = taught.get("context", {}).get(model.id)
            if isinstance(window, int) and window > 0 and window != model.context_window:
                model = model.model_copy(update={"context_window": window})
            features = (taught.get("features") or {}).get(model.id)
            if isinstance(features, dict):
                model = model.model_copy(update={name: [str(f) for f in features.get(name) or []]
                                                 for name in ("capabilities", "lacks")})
            deployments.append(Deployment(model, provider))
        known = {(d.model.id, d.provider.id) for d in deployments}
        for provider_id, taught in learned.items():
            provider = self.providers.get(provider_id)
            if provider is None:
                continue
            for raw in taught.get("added") or ():
                try:
                    model = ModelConfig.model_validate({**raw, "provider": provider_id})
                except ValidationError:
                    continue
                if (model.id, provider_id) not in known:
                    known.add((model.id, provider_id))
                    deployments.append(Deployment(model, provider))
        if [(d.key, d.model) for d in deployments] == [(d.key, d.model) for d in self.deployments]:
            return False
        self.deployments[:] = deployments
        return True

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
