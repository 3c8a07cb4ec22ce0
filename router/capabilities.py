"""What a request needs of a model, and which deployments have it (policy as data).

A request needs a feature when its body uses it: tools, image parts, a JSON response format. A
deployment has it when its catalog entry (or its provider's listing) names a capability that
provides it, or, for features assumed by default (JSON output), when nothing says it lacks it;
and it has not said otherwise since: a provider's "does not support tools" marks the deployment
for that feature, shared by every worker, for a while (router/health.py, UNSUPPORTED_PREFIX).
Candidates without a needed feature are left out before ranking; when none is left the caller
gets a 400 that names what is missing.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.catalog import Deployment
from router.keyspace import DeploymentHealth


@dataclass(frozen=True)
class Feature:
    """One thing a request may need of a model."""

    name: str  # the mark NotServable.feature and the health hash use
    provided_by: frozenset[str]  # catalog capabilities any of which provides it
    # Whether a model whose entry says nothing about it is taken to have it. Tool calling and
    # image input are declared by the catalog where a model has them; JSON output is taken by
    # nearly every OpenAI-compatible server, so it is assumed until the listing or the
    # deployment itself says otherwise (ModelConfig.lacks, a refusal's mark).
    assumed: bool
    label: str  # how a 400 names it
    param: str  # the request field that asks for it


FEATURES: Mapping[str, Feature] = {f.name: f for f in (
    Feature("tools", frozenset({"tools"}), False, "tool calling (tools)", "tools"),
    Feature("vision", frozenset({"vision"}), False, "image input (image_url content parts)", "messages"),
    # Structured outputs validate against a schema; a model that has them also does plain JSON mode.
    Feature("json", frozenset({"json", "structured_outputs"}), True, "JSON mode (response_format json_object)",
            "response_format"),
    Feature("structured_outputs", frozenset({"structured_outputs"}), True,
            "structured outputs (response_format json_schema)", "response_format"),
    # Embedding models: a chosen output size, and input given as token ids rather than text.
    Feature("dimensions", frozenset({"dimensions"}), False, "a chosen output size (dimensions)", "dimensions"),
    Feature("token_input", frozenset({"token_input"}), False, "input as token ids", "input"),
)}

# Request fields whose refusal by a provider means the deployment lacks a feature the request needs.
_FIELD_FEATURES = {"tools": "tools", "tool_choice": "tools", "functions": "tools", "function_call": "tools"}


def required(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The features this request needs, in FEATURES order."""
    needs: set[str] = set()
    if body.get("tools") or body.get("functions"):
        needs.add("tools")
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        needs.add("json")
    elif kind == "json_schema":
        needs.add("structured_outputs")
    if _has_image(body.get("messages")):
        needs.add("vision")
    return tuple(name for name in FEATURES if name in needs)


def request_needs(body: Mapping[str, Any]) -> frozenset[str]:
    """Everything a deployment may say it lacks that this request uses, in NotServable.feature's
    words: its top-level fields, its features, and "data_policy" (which every request needs)."""
    needs = {name for name, value in body.items() if value is not None}
    needs.add("data_policy")
    features = required(body)
    needs.update(features)
    if "structured_outputs" in features:
        needs.add("json")  # a model without JSON mode has no structured outputs either
    return frozenset(needs)


def _has_image(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(part, dict) and part.get("type") == "image_url"
                                             for part in content):
            return True
    return False


def has(deployment: Deployment, feature: str, health: DeploymentHealth, now_ms: int) -> bool:
    """The deployment provides `feature` and has not said otherwise since."""
    spec = FEATURES[feature]
    model = deployment.model
    if health.lacks(feature, now_ms) or feature in model.lacks:
        return False
    return spec.assumed or bool(spec.provided_by.intersection(model.capabilities))


def missing(candidates: Sequence[Deployment], features: Sequence[str],
            health_of: Callable[[Deployment], DeploymentHealth], now_ms: int) -> list[str]:
    """The needed features that no candidate has (all of them when each has some, but none all)."""
    lacking = [f for f in features if not any(has(d, f, health_of(d), now_ms) for d in candidates)]
    return lacking or list(features)


def learned_feature(refused: str | None, needs: Sequence[str]) -> str | None:
    """What a refusal teaches about a deployment, in this request's terms.

    A refused "tools" field is the tools feature; a refused response format (or an error about
    JSON) is the JSON feature this request asked for, so a model refusing json_schema is not
    thereby marked as lacking plain JSON mode. Anything else is named as it was refused.
    """
    if refused is None:
        return None
    refused = _FIELD_FEATURES.get(refused, refused)
    if refused in ("json", "response_format"):
        return "structured_outputs" if "structured_outputs" in needs else "json"
    return refused


def describe(features: Sequence[str]) -> tuple[str, str]:
    """(what is missing, in words; the request field that asked for the first of it)."""
    specs = [FEATURES[f] for f in features]
    return " and ".join(s.label for s in specs), specs[0].param
