"""Classify an OpenAI chat request as code, reasoning or general."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.intent.explain import Evidence, deciding, reason
from router.intent.features import Features, extract
from router.intent.model import LABELS, Intent, Model, Scored, default_model, softmax

# Earlier turns and the system prompt are context: they shift a long last user
# turn's scores but never outweigh a clear one. A last turn shorter than
# SHORT_TURN_CHARS is blended with a reading of the whole transcript instead.
CONTEXT_WEIGHT = 0.25
SYSTEM_WEIGHT = 0.2
SHORT_TURN_CHARS = 100
# Context windows: how much of the earlier conversation is read at most. Each is one
# more feature extraction, so they also bound a long conversation's cost.
CONTEXT_CHARS = 600
SYSTEM_CHARS = 600
# Tool definitions mostly come from agents (coding agents above all), but a weather or
# search tool is common too, so tools only tip a close call towards code.
TOOLS_CODE_BIAS = 0.3


@dataclass(frozen=True)
class IntentResult:
    """The routing intent, the model's probability for it, and why."""

    intent: Intent
    confidence: float
    reason: str


def classify_text(prompt: str) -> IntentResult:
    """Classify a single user prompt."""
    return classify_request([{"role": "user", "content": prompt}])


def classify_request(
    messages: Sequence[Mapping[str, Any]],
    *,
    has_tools: bool = False,
    response_format: Mapping[str, Any] | None = None,
) -> IntentResult:
    """Classify an OpenAI chat request from its messages, tools and response format."""
    return _decide(messages, has_tools, response_format)[0]


def explain_request(
    messages: Sequence[Mapping[str, Any]],
    *,
    has_tools: bool = False,
    response_format: Mapping[str, Any] | None = None,
) -> tuple[IntentResult, list[Evidence]]:
    """The result and the features that decided it; those may quote the prompt."""
    result, scored, best = _decide(messages, has_tools, response_format)
    return result, (deciding(scored, best) if scored is not None else [])


def _decide(
    messages: Sequence[Mapping[str, Any]], has_tools: bool, response_format: Mapping[str, Any] | None
) -> tuple[IntentResult, Scored | None, int]:
    model = default_model()
    last_user, earlier, system = _split(messages)
    if not last_user.strip() and not earlier.strip():
        return IntentResult("general", round(1.0 / len(LABELS), 4), "general: no user text"), None, 2

    notes: list[str] = []
    alone = model.score(extract(last_user))
    scored = alone
    logits = list(alone.logits)
    n_chars = len(last_user.strip())
    if n_chars < SHORT_TURN_CHARS and (earlier or system):
        # A short follow-up ("why?", "now in Go", "and the second one?") means little
        # alone: blend in a reading of the whole transcript, the more the shorter it is.
        blend = 1.0 - n_chars / SHORT_TURN_CHARS
        whole = model.score(extract("\n".join(t for t in (system, earlier, last_user) if t)))
        logits = [(1 - blend) * a + blend * w for a, w in zip(alone.logits, whole.logits, strict=True)]
        if blend >= 0.5:
            scored = whole
    else:
        if earlier:
            _add_context(logits, model, extract(earlier), CONTEXT_WEIGHT)
        if system:
            _add_context(logits, model, extract(system), SYSTEM_WEIGHT)
    if _argmax(logits) != _argmax(alone.logits):
        notes.append("conversation context")
    if has_tools:
        before_tools = _argmax(logits)
        logits[0] += TOOLS_CODE_BIAS
        if _argmax(logits) != before_tools:
            notes.append("tools")
    probs = softmax(logits)
    best = _argmax(probs)
    if response_format and response_format.get("type") in ("json_object", "json_schema"):
        # Structured output is a formatting constraint, not an intent; it is only noted.
        notes.append("json output")
    return IntentResult(LABELS[best], round(probs[best], 4), reason(scored, best, notes)), scored, best


def _argmax(values: Sequence[float]) -> int:
    # Ties go to the earlier label, so the result never depends on float noise order.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _add_context(logits: list[float], model: Model, feats: Features, weight: float) -> None:
    # The bias is already in `logits` once; only the features' evidence is added.
    ctx = model.logits(feats)
    for i in range(len(logits)):
        logits[i] += weight * (ctx[i] - model.bias[i])


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") in ("text", "input_text")
        ]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _split(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str, str]:
    """(last user turn, the turns before it within a budget, system prompt)."""
    system_parts = [
        _text_of(m.get("content"))[:SYSTEM_CHARS] for m in messages if m.get("role") in ("system", "developer")
    ]
    system = "\n".join(system_parts)[:SYSTEM_CHARS].strip()
    last_idx = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    if last_idx is None:
        # No user turn at all (odd, but valid): the last message with text stands in.
        texts = [_text_of(m.get("content")) for m in messages if m.get("role") not in ("system", "developer")]
        return (texts[-1] if texts else ""), "", system
    earlier: list[str] = []
    budget = CONTEXT_CHARS
    for m in reversed(messages[:last_idx]):
        if budget <= 0:
            break
        if m.get("role") in ("user", "assistant", "tool"):
            # Keep the end of each turn: the newest context matters most.
            text = _text_of(m.get("content"))[-budget:]
            earlier.append(text)
            budget -= len(text)
    earlier.reverse()
    return _text_of(messages[last_idx].get("content")), "\n".join(earlier).strip(), system
