"""Classify an OpenAI chat request as code, reasoning or general."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.intent.features import Features, extract
from router.intent.lexicon import REASON_STOPWORDS
from router.intent.model import LABELS, Intent, Model, Scored, default_model, softmax

# Earlier turns and the system prompt are context: they shift a long last user
# turn's scores but never outweigh a clear one. A last turn shorter than
# SHORT_TURN_CHARS is blended with a reading of the whole transcript instead.
CONTEXT_WEIGHT = 0.25
SYSTEM_WEIGHT = 0.2
SHORT_TURN_CHARS = 100
# Context windows: how much of the earlier conversation is read at most.
CONTEXT_CHARS = 2000
SYSTEM_CHARS = 1500
# Tool definitions mostly come from agents (coding agents above all), but a weather or
# search tool is common too, so tools only tip a close call towards code.
TOOLS_CODE_BIAS = 0.3

_CUE_REASONS = {
    "cue:code_fence": "code block",
    "cue:traceback": "error/stack trace",
    "cue:file_name": "file name",
    "cue:code_line": "code line",
    "cue:code_punct": "code syntax",
    "cue:snake_case": "identifier",
    "cue:camel_case": "identifier",
    "cue:method_call": "method call",
    "cue:html_tag": "markup tag",
    "cue:assert_test": "test asserts",
    "cue:indented_block": "indented block",
    "cue:latex": "math notation",
    "cue:math_symbol": "math symbol",
    "cue:equation": "equation",
    "cue:arith": "arithmetic",
    "cue:percent": "percentages",
    "cue:money": "money amounts",
    "cue:choices": "multiple choice",
    "cue:quantified": "syllogism",
    "cue:mathword_1": "math/logic word",
    "cue:mathword_2plus": "math/logic words",
    "cue:tech_1": "tech name",
    "cue:tech_2plus": "tech names",
    "cue:codeword_2plus": "programming words",
    "cue:code_phrase": "code request",
    "cue:pipe_table": "table",
    "cue:url": "link",
    "cue:nums_4_8": "several numbers",
    "cue:nums_many": "many numbers",
    "cue:nums_2_3": "numbers",
    "cue:question": "question",
}


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
    model = default_model()
    last_user, earlier, system = _split(messages)
    if not last_user.strip() and not earlier.strip():
        return IntentResult("general", round(1.0 / len(LABELS), 4), "no user text")

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
    return IntentResult(LABELS[best], round(probs[best], 4), _reason(scored, best, notes))


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


def _reason(scored: Scored, best: int, notes: list[str]) -> str:
    """The strongest few features for the chosen label, in words."""
    o1, o2 = (i for i in range(len(LABELS)) if i != best)
    k = scored.scale
    # Stems and character n-grams ("c:", "p:") are never shown, so are not ranked.
    margins = [
        ((w[best] - (w[o1] if w[o1] > w[o2] else w[o2])) * k, name) for name, w in scored.lexical if name[1:2] != ":"
    ]
    margins += [(w[best] - (w[o1] if w[o1] > w[o2] else w[o2]), name) for name, w in scored.cues]
    top = heapq.nlargest(12, [m for m in margins if m[0] > 0])
    words: list[str] = []
    for _, name in top:
        text = _describe(name)
        if text and text not in words:
            words.append(text)
        if len(words) == 3:
            break
    words.extend(notes)
    return " + ".join(words) if words else "no strong cue (default)"


def _describe(name: str) -> str | None:
    if name.startswith("cue:"):
        return _CUE_REASONS.get(name)
    if name.startswith(("c:", "p:")):
        # Character n-grams and stems are real evidence but unreadable as a reason.
        return None
    words = [w for w in name.removeprefix("^").split() if w != "<s>"]
    if not words or all(w in REASON_STOPWORDS or not w.isalnum() for w in words):
        return None
    return "'" + " ".join("N" if w == "<num>" else w for w in words) + "'"
