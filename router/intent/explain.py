"""Why a prompt got its intent, in two forms.

`reason` is header-safe: it travels in `x-freeference-intent-reason` and in logs, so
it is built only from the fixed phrases below (the class, cue names, feature groups)
and never from a word, identifier or character n-gram of the prompt. `deciding`
lists the actual features with their weights, for `freeference classify --explain`,
where the person reading typed the prompt themselves.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from router.intent.model import LABELS, LEXICAL_GROUPS, Scored

CUE_GROUPS = {
    "code_fence": "code block",
    "traceback": "stack-trace cue",
    "file_name": "file-name cue",
    "code_line": "code-line cue",
    "code_punct": "code syntax",
    "snake_case": "identifier shape",
    "camel_case": "identifier shape",
    "method_call": "code syntax",
    "html_tag": "markup tag",
    "assert_test": "test asserts",
    "indented_block": "indented block",
    "latex": "math notation",
    "math_symbol": "math notation",
    "equation": "equation",
    "arith": "arithmetic",
    "percent": "percentages",
    "money": "money amounts",
    "choices": "multiple choice",
    "quantified": "quantified premises",
    "kinship": "family relations",
    "premises_2plus": "logic premises",
    "premises_4plus": "logic premises",
    "statements_3plus": "statement list",
    "statements_5plus": "statement list",
    "mathword_1": "math/logic vocabulary",
    "mathword_2plus": "math/logic vocabulary",
    "tech_1": "tech names",
    "tech_2plus": "tech names",
    "codeword_1": "code vocabulary",
    "codeword_2plus": "code vocabulary",
    "code_phrase": "code request",
    "pipe_table": "table",
    "url": "link",
    "question": "question form",
}
# Cues that describe every prompt (its length, how many numbers) explain nothing alone.
_SHAPE_GROUPS = {"len": "prompt length", "nums": "number count", "numdens": "number density"}
# Lexical features are grouped by kind only; the word lists they may belong to have
# cues of their own (tech names, code vocabulary, math/logic vocabulary).
NOTES = ("conversation context", "tools", "json output", "no user text")
FALLBACK = "no strong cue (default)"
# Every phrase `reason` may contain; a test holds the reason to this closed set.
PHRASES = frozenset(CUE_GROUPS.values()) | frozenset(_SHAPE_GROUPS.values()) | frozenset(LEXICAL_GROUPS)
PHRASES |= frozenset(NOTES) | {FALLBACK}


@dataclass(frozen=True, slots=True)
class Evidence:
    """One feature's push towards the chosen label over the runner-up."""

    margin: float
    feature: str
    group: str


@lru_cache(maxsize=1 << 17)
def group_of(feature: str) -> str:
    """The fixed, prompt-free name of the group a feature belongs to."""
    if feature.startswith("cue:"):
        name = feature[4:]
        if name in CUE_GROUPS:
            return CUE_GROUPS[name]
        return _SHAPE_GROUPS.get(name.split("_", 1)[0], "wording")
    if feature[1:2] == ":":
        return "word pieces"
    if feature.startswith("^"):
        return "opening words"
    return "wording"


def evidence(scored: Scored, best: int) -> list[Evidence]:
    """Every known feature's margin for label `best` over the strongest other label."""
    o1, o2 = (i for i in range(len(LABELS)) if i != best)
    out = [Evidence((w[best] - max(w[o1], w[o2])) * scored.scale, name, group_of(name)) for name, w in scored.lexical]
    out += [Evidence(w[best] - max(w[o1], w[o2]), name, group_of(name)) for name, w in scored.cues]
    return out


def reason(scored: Scored, best: int, notes: Sequence[str] = ()) -> str:
    """`"<intent>: <group> + <group>"`, naming at most three feature groups, then notes."""
    # Runs on every request, so it stays cheap: margins against the runner-up label
    # only, and no Evidence objects.
    logits = scored.logits
    runner = max((i for i in range(len(LABELS)) if i != best), key=lambda i: logits[i])
    totals = {group: w[best] - w[runner] for group, w in zip(LEXICAL_GROUPS, scored.groups, strict=True)}
    for name, w in scored.cues:
        group = group_of(name)
        totals[group] = totals.get(group, 0.0) + w[best] - w[runner]
    groups = [g for g, m in heapq.nlargest(3, totals.items(), key=lambda gm: gm[1]) if m > 0.05]
    parts = [*groups, *(n for n in notes if n in NOTES)]
    return f"{LABELS[best]}: " + (" + ".join(parts) if parts else FALLBACK)


def deciding(scored: Scored, best: int, top: int = 12) -> list[Evidence]:
    """The features that pushed hardest for `best`, strongest first (may quote the prompt)."""
    return heapq.nlargest(top, (e for e in evidence(scored, best) if e.margin > 0), key=lambda e: e.margin)
