"""Candidate selection: which deployments may serve a request, best first."""

from collections.abc import Sequence

from router.catalog import Deployment, RuntimeCatalog
from settings.catalog import Intent


class NoCandidates(Exception):
    """Nothing in the catalog can serve this request right now."""


def candidates_for(catalog: RuntimeCatalog, requested: str | None, intent: Intent,
                   fallbacks: Sequence[str] = ()) -> list[Deployment]:
    """Ordered candidates for a model reference (None → the intent), then explicit fallbacks."""
    ordered: list[Deployment] = []
    for name in (requested, *fallbacks):
        ordered.extend(_resolve(catalog, name, intent))
    seen: set[str] = set()
    unique = [d for d in ordered if not (d.key in seen or seen.add(d.key))]  # type: ignore[func-returns-value]
    if not unique:
        raise NoCandidates(requested or intent)
    return unique


def _resolve(catalog: RuntimeCatalog, name: str | None, intent: Intent) -> list[Deployment]:
    if name is None or name in ("", "auto"):
        return catalog.for_intent(intent)
    capability_intent = catalog.intent_of_capability(name)
    if capability_intent is not None:
        return catalog.for_intent(capability_intent)
    return catalog.by_model_id(name)
