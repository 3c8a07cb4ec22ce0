"""Evaluate the intent classifier: `python -m bench.intent_eval [DEV_JSONL]`.

Reports k-fold cross-validated accuracy on the dev set (each fold's model is trained
on the other folds plus the project's own training prompts, never on the fold it is
tested on), accuracy of the shipped model on the project's holdout prompts (never
trained on), per-label precision/recall, confusion matrices, latency and memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from router.intent import LABELS, classify_text
from router.intent.features import extract
from router.intent.model import Model, default_model
from router.intent.train import DATA_DIR, Example, TrainConfig, fit, load_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEV = REPO_ROOT / ".." / "shared" / "data" / "intent-dev.jsonl"
OWN_TRAIN = DATA_DIR / "train.jsonl"
HOLDOUT = DATA_DIR / "holdout.jsonl"
LONG_PROMPT_CHARS = 4000

Predict = Callable[[str], str]


def _model_predict(model: Model) -> Predict:
    def predict(prompt: str) -> str:
        logits = model.logits(extract(prompt))
        return LABELS[max(range(len(LABELS)), key=lambda i: (logits[i], -i))]

    return predict


def cross_validate(dev: Sequence[Example], own: Sequence[Example], k: int, seed: int) -> list[str]:
    """Out-of-fold predictions for every dev row, in dev order."""
    order = list(range(len(dev)))
    random.Random(seed).shuffle(order)
    fold_of = {row: pos % k for pos, row in enumerate(order)}
    preds = [""] * len(dev)
    for fold in range(k):
        train = [dev[i] for i in range(len(dev)) if fold_of[i] != fold] + list(own)
        predict = _model_predict(fit(train, TrainConfig()))
        for i in range(len(dev)):
            if fold_of[i] == fold:
                preds[i] = predict(dev[i].prompt)
    return preds


def report(title: str, gold: Sequence[str], pred: Sequence[str]) -> float:
    """Print accuracy, per-label precision/recall and the confusion matrix."""
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    accuracy = correct / len(gold)
    print(f"\n## {title}: accuracy {accuracy:.4f} ({correct}/{len(gold)})")
    print(f"{'label':<10} {'precision':>9} {'recall':>7} {'f1':>6} {'n':>5}")
    for label in LABELS:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        n_pred = sum(p == label for p in pred)
        n_gold = sum(g == label for g in gold)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        print(f"{label:<10} {prec:>9.3f} {rec:>7.3f} {f1:>6.3f} {n_gold:>5}")
    print("confusion (rows = gold, cols = predicted)")
    print(" " * 10 + "".join(f"{label:>10}" for label in LABELS))
    for g_label in LABELS:
        cells = [sum(g == g_label and p == p_label for g, p in zip(gold, pred, strict=True)) for p_label in LABELS]
        print(f"{g_label:<10}" + "".join(f"{c:>10}" for c in cells))
    return accuracy


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def latency(prompts: Sequence[str], repeats: int) -> dict[str, float]:
    """p50/p99 of classify_text in ms: wall clock, and CPU time of this thread (which
    leaves out time spent waiting for a core while other processes load the machine)."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        for prompt in prompts:
            start_cpu = time.thread_time()
            start = time.perf_counter()
            classify_text(prompt)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.thread_time() - start_cpu) * 1000)
    wall.sort()
    cpu.sort()
    return {
        "p50": statistics.median(wall),
        "p99": _percentile(wall, 0.99),
        "cpu_p50": statistics.median(cpu),
        "cpu_p99": _percentile(cpu, 0.99),
    }


_RSS_PROBE = """
def rss_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
before = rss_kb()
from router.intent import classify_text
classify_text("hello")
print(rss_kb() - before)
"""


def _model_rss_mb() -> float:
    """Resident memory the classifier adds to a fresh interpreter (Linux /proc)."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def _long(prompt: str) -> str:
    return ((prompt + "\n") * (LONG_PROMPT_CHARS // (len(prompt) + 1) + 1))[:LONG_PROMPT_CHARS]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation and print a report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dev", nargs="?", type=Path, default=DEFAULT_DEV)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="latency passes over the prompts")
    parser.add_argument("--errors", action="store_true", help="list misclassified prompts")
    args = parser.parse_args(argv)

    dev = load_jsonl(args.dev)
    own = load_jsonl(OWN_TRAIN)
    holdout = load_jsonl(HOLDOUT)
    print(f"dev {len(dev)} rows ({args.dev}); own training {len(own)}; holdout {len(holdout)}")

    preds = cross_validate(dev, own, args.folds, args.seed)
    report(f"dev, {args.folds}-fold cross-validation", [r.label for r in dev], preds)
    if args.errors:
        for row, pred in zip(dev, preds, strict=True):
            if row.label != pred:
                print(f"  gold={row.label} pred={pred}: {row.prompt[:100]!r}")

    gc.collect()
    start = time.perf_counter()
    model = default_model()
    load_ms = (time.perf_counter() - start) * 1000
    hold_preds = [classify_text(r.prompt).intent for r in holdout]
    report("holdout (shipped model, never trained on these)", [r.label for r in holdout], hold_preds)
    if args.errors:
        for row, pred in zip(holdout, hold_preds, strict=True):
            if row.label != pred:
                print(f"  gold={row.label} pred={pred}: {row.prompt[:100]!r}")

    short = latency([r.prompt for r in dev], args.repeats)
    long = latency([_long(r.prompt) for r in dev], args.repeats)
    print(f"\n## latency (one core, model loaded in {load_ms:.0f} ms, {len(model.weights)} weights)")
    print(f"load average (1 min) {os.getloadavg()[0]:.2f}; cpu = thread CPU time, excludes waiting for a core")
    for name, stats in (("dev prompts", short), (f"{LONG_PROMPT_CHARS}-char prompts", long)):
        print(
            f"{name:<19} wall p50 {stats['p50']:.3f} ms  p99 {stats['p99']:.3f} ms"
            f"   cpu p50 {stats['cpu_p50']:.3f} ms  p99 {stats['cpu_p99']:.3f} ms"
        )
    print(f"memory: {_model_rss_mb():.1f} MB extra resident after loading the model in a fresh process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
