"""One implementation's side of `bench.intent_eval`, run in its own interpreter.

Reads a task (JSON on stdin), writes results (JSON on stdout). It imports
`router.intent` from whatever tree is first on `sys.path`, so the same driver runs
today's classifier (a `git archive` of the base commit) and the working tree's,
and both are measured by the same code. It uses only what both versions have:
`train.fit`, `train.Example`, `classify.classify_request` and `model.default_model`.

Task: {"folds": [{"train": [[prompt, label], ...], "test": [prompt, ...]}],
       "shipped": [prompt, ...], "latency": [prompt, ...], "conversations": [[message, ...], ...],
       "repeats": int}
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from router.intent import classify as classify_mod
from router.intent import model as model_mod
from router.intent.train import Example, fit


def _predict_all(prompts: list[str]) -> list[str]:
    return [classify_mod.classify_request([{"role": "user", "content": p}]).intent for p in prompts]


def _with_model(model: Any, prompts: list[str]) -> list[str]:
    # The classifier reads its model through default_model(); point it at the fold's.
    saved = classify_mod.default_model
    classify_mod.default_model = lambda: model  # type: ignore[assignment]
    try:
        return _predict_all(prompts)
    finally:
        classify_mod.default_model = saved


def _latency_ms(requests: list[list[dict[str, str]]], repeats: int) -> tuple[list[float], list[float]]:
    """Wall clock and this thread's CPU time per call; on a shared machine the wall
    clock also counts time spent waiting for a core."""
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        for messages in requests:
            start_cpu = time.thread_time()
            start = time.perf_counter()
            classify_mod.classify_request(messages)
            wall.append((time.perf_counter() - start) * 1000)
            cpu.append((time.thread_time() - start_cpu) * 1000)
    return wall, cpu


def main() -> int:
    """Run the task on stdin."""
    task = json.load(sys.stdin)
    result: dict[str, Any] = {}
    if "folds" in task:
        result["folds"] = [
            _with_model(fit([Example(p, label) for p, label in fold["train"]]), fold["test"]) for fold in task["folds"]
        ]
    if task.get("shipped") or task.get("latency"):
        start = time.perf_counter()
        model_mod.default_model()
        result["load_ms"] = (time.perf_counter() - start) * 1000
        result["shipped"] = _predict_all(task.get("shipped", []))
        requests = [[{"role": "user", "content": p}] for p in task.get("latency", [])]
        requests += task.get("conversations", [])
        result["latency_ms"], result["cpu_ms"] = _latency_ms(requests, int(task.get("repeats", 1)))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
