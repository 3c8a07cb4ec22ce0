"""Rebuild the shipped weights: `python -m router.intent.train [--extra FILE ...]`.

Pure Python (no numpy/sklearn): AdaGrad on the softmax cross-entropy with L2, a few
epochs over a few thousand prompts, well under a minute on one core. Trains on every
labelled file in `data/intent/` except `holdout.jsonl` (which is never read here),
plus the files given with `--extra` (the public-source rows, see docs/intent.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from router.intent.features import Features, extract
from router.intent.model import LABELS, WEIGHTS_FILE, Intent, Model, Vector, softmax

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data" / "intent"
HOLDOUT_FILE = DATA_DIR / "holdout.jsonl"
OUT_PATH = Path(__file__).resolve().parent / WEIGHTS_FILE


@dataclass(frozen=True, slots=True)
class Example:
    """A labelled prompt."""

    prompt: str
    label: Intent
    source: str = ""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Hyper-parameters; chosen once by cross-validation, not per fold."""

    epochs: int = 12
    learning_rate: float = 0.3
    l2: float = 1e-4
    # A lexical feature seen in a single prompt is mostly noise, and triples the file.
    min_count: int = 2
    # Weights this small change no decision; dropping them keeps the file small.
    prune_below: float = 0.005
    seed: int = 13
    # Added to the trained bias, per label. On sources the model never saw, general
    # prompts are the ones most often misread (as reasoning); +0.1 logit for general
    # lifted its recall by 0.7 points at no cost in accuracy (docs/intent.md).
    bias_shift: Vector = (0.0, 0.0, 0.1)


def load_jsonl(path: Path) -> list[Example]:
    """Read `{"prompt", "label"[, "source"]}` lines."""
    rows: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            obj = json.loads(line)
            label = obj["label"]
            if label not in LABELS:
                raise ValueError(f"{path}: unknown label {label!r}")
            rows.append(Example(obj["prompt"], label, obj.get("source", "")))
    return rows


def _vectorise(feats: Features, vocab: set[str] | None) -> list[tuple[str, float]]:
    lexical = [f for f in feats.lexical if vocab is None or f in vocab]
    # Same scaling as Model.score: by the count of all lexical features, so
    # train and run time agree even though run time also sees unknown n-grams.
    scale = 1.0 / math.sqrt(len(feats.lexical)) if feats.lexical else 0.0
    return [(f, scale) for f in lexical] + [("cue:" + c, 1.0) for c in feats.cues]


def fit(examples: Sequence[Example], config: TrainConfig | None = None) -> Model:
    """Train a model on `examples`."""
    return fit_features([(extract(ex.prompt), LABELS.index(ex.label)) for ex in examples], config)


def fit_features(featurised: Sequence[tuple[Features, int]], config: TrainConfig | None = None) -> Model:
    """Train a model on already extracted features and label indices."""
    cfg = config or TrainConfig()
    counts: Counter[str] = Counter()
    for feats, _ in featurised:
        counts.update(feats.lexical)
    vocab = {f for f, n in counts.items() if n >= cfg.min_count}
    data = [(_vectorise(feats, vocab), y) for feats, y in featurised]

    n_labels = len(LABELS)
    weights: dict[str, list[float]] = {}
    sq_grads: dict[str, list[float]] = {}
    bias = [0.0] * n_labels
    bias_sq = [1e-8] * n_labels
    rng = random.Random(cfg.seed)
    order = list(range(len(data)))
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        for idx in order:
            x, y = data[idx]
            logits = list(bias)
            for name, value in x:
                w = weights.get(name)
                if w is not None:
                    for c in range(n_labels):
                        logits[c] += w[c] * value
            probs = softmax(logits)
            err = [probs[c] - (1.0 if c == y else 0.0) for c in range(n_labels)]
            for c in range(n_labels):
                bias_sq[c] += err[c] * err[c]
                bias[c] -= cfg.learning_rate * err[c] / math.sqrt(bias_sq[c])
            for name, value in x:
                w = weights.setdefault(name, [0.0] * n_labels)
                g2 = sq_grads.setdefault(name, [1e-8] * n_labels)
                for c in range(n_labels):
                    grad = err[c] * value + cfg.l2 * w[c]
                    g2[c] += grad * grad
                    w[c] -= cfg.learning_rate * grad / math.sqrt(g2[c])

    kept: dict[str, Vector] = {}
    for name, w in weights.items():
        if max(abs(v) for v in w) >= cfg.prune_below:
            kept[name] = (w[0], w[1], w[2])
    shift = cfg.bias_shift
    return Model(bias=(bias[0] + shift[0], bias[1] + shift[1], bias[2] + shift[2]), weights=kept)


def training_files(extra: Iterable[Path] = ()) -> list[Path]:
    """Every labelled file in data/intent except the holdout, sorted, then `extra`."""
    return sorted(p for p in DATA_DIR.glob("*.jsonl") if p != HOLDOUT_FILE) + list(extra)


def load_training_data(paths: Iterable[Path] | None = None) -> list[Example]:
    """All training examples, in file order."""
    rows: list[Example] = []
    for path in training_files() if paths is None else paths:
        rows.extend(load_jsonl(path))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Train on the repo's data and write the package's weights file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more labelled JSONL files")
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    rows = load_training_data(training_files(args.extra))
    model = fit(rows)
    args.out.write_text(model.to_json() + "\n", encoding="utf-8")
    by_label = Counter(r.label for r in rows)
    print(f"trained on {len(rows)} prompts {dict(by_label)}; {len(model.weights)} weights -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
