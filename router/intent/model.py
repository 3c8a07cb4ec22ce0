"""A multinomial logistic model over sparse string features, stored as JSON.

The weights file is small (a few MB) and read once per process, on first use, so
importing the package costs nothing for processes that never classify.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from router.intent.features import Features

Intent = Literal["code", "reasoning", "general"]
LABELS: tuple[Intent, ...] = ("code", "reasoning", "general")
WEIGHTS_FILE = "weights.json"

Vector = tuple[float, float, float]
# The lexical feature groups, in the order `Features.lexical` holds them.
LEXICAL_GROUPS = ("wording", "opening words", "word pieces")


@dataclass(frozen=True, slots=True)
class Scored:
    """A prompt's logits and the weights of the features that produced them."""

    logits: list[float]
    names: tuple[str, ...]
    weights: Mapping[str, Vector]
    scale: float
    cues: list[tuple[str, Vector]]
    # Each lexical group's scaled evidence, in LEXICAL_GROUPS order: `reason` reads
    # these three instead of walking every lexical feature a second time.
    groups: list[Vector]

    @property
    def lexical(self) -> list[tuple[str, Vector]]:
        """The known lexical features and their weights; only `explain` needs them,
        so they are not collected on the routing path."""
        get = self.weights.get
        return [(name, w) for name in self.names if (w := get(name)) is not None]


@dataclass(frozen=True, slots=True)
class Model:
    """Per-feature weight vectors (one float per label) and a bias."""

    bias: Vector
    weights: Mapping[str, Vector]

    def score(self, feats: Features) -> Scored:
        """Logits plus the known features behind them."""
        get = self.weights.get
        names = feats.lexical
        end_wording, end_opening = feats.group_ends
        # Lexical evidence is scaled by 1/sqrt(#features) so long prompts do not get
        # extreme scores just for being long; cues count once each.
        scale = 1.0 / math.sqrt(len(names)) if names else 0.0
        groups: list[Vector] = []
        a, b, c = self.bias
        for part in (names[:end_wording], names[end_wording:end_opening], names[end_opening:]):
            known = [w for w in map(get, part) if w is not None]
            # zip and sum run in C: a third of the cost of adding up in a Python loop.
            la, lb, lc = map(sum, zip(*known, strict=True)) if known else (0.0, 0.0, 0.0)
            groups.append((la * scale, lb * scale, lc * scale))
            a, b, c = a + la * scale, b + lb * scale, c + lc * scale
        cues = [(name, w) for name in ("cue:" + cue for cue in feats.cues) if (w := get(name)) is not None]
        for _, w in cues:
            a += w[0]
            b += w[1]
            c += w[2]
        return Scored(logits=[a, b, c], names=names, weights=self.weights, scale=scale, cues=cues, groups=groups)

    def logits(self, feats: Features) -> list[float]:
        """Unnormalised scores per label, in LABELS order."""
        return self.score(feats).logits

    def to_json(self) -> str:
        """Serialise with rounded floats; 4 decimals change no decision we measured."""
        body = {
            "labels": list(LABELS),
            "bias": [round(b, 4) for b in self.bias],
            "weights": {k: [round(x, 4) for x in v] for k, v in sorted(self.weights.items())},
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Model:
        """Parse what `to_json` wrote."""
        body = json.loads(text)
        if tuple(body["labels"]) != LABELS:
            raise ValueError(f"weights were trained for labels {body['labels']}, expected {LABELS}")
        return cls(bias=_vec(body["bias"]), weights={k: _vec(v) for k, v in body["weights"].items()})


def softmax(logits: Sequence[float]) -> list[float]:
    """Probabilities from logits, numerically safe."""
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _vec(values: Iterable[float]) -> Vector:
    a, b, c = values
    return (float(a), float(b), float(c))


@cache
def default_model() -> Model:
    """The shipped model, loaded once per process."""
    text = resources.files("router.intent").joinpath(WEIGHTS_FILE).read_text(encoding="utf-8")
    return Model.from_json(text)
