"""Build intent training rows from public datasets' training splits.

`python -m bench.intent_sources --raw DIR --out FILE [--generated FILE]`

DIR holds the untouched source files (named as in `SOURCES` below, each taken from
the public repository it names). Every row keeps the file it came from in `source`,
so the evaluation can hold out a whole source, and the table in docs/intent.md can
say where each row came from and under which license. Only training splits are read;
no public benchmark's test split is used. With `--generated FILE`, logic puzzles
are also generated with the `reasoning-gym` package (Apache-2.0), which must be
installed in the running interpreter; it is not a dependency of the gateway.

Sampling is seeded, so the same inputs give the same rows.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEED = 20261206

# file in DIR -> (source as owner/repo:path, label or None when decided per row)
SOURCES = {
    "gsm8k_train.jsonl": "openai/grade-school-math:grade_school_math/data/train.jsonl",
    "mbpp.jsonl": "deepseek-ai/DeepSeek-Coder:Evaluation/MBPP/data/mbpp.jsonl",
    "folio_train.jsonl": "Yale-LILY/FOLIO:data/v0.0/folio-train.jsonl",
    "gpteacher_codegen.json": "teknium1/GPTeacher:Codegen/codegen-instruct.json",
    "gpteacher_roleplay.json": "teknium1/GPTeacher:Roleplay/roleplay-simple-deduped-roleplay-instruct.json",
    "t0": "yizhongw/self-instruct:data/finetuning/t0_train_50k/data_per_template",
}
REASONING_GYM = "pypi:reasoning-gym==0.1.25"

# MBPP's own split by task id: 1-10 prompt, 11-510 test, 511-600 validation, 601-974 train.
MBPP_TRAIN_IDS = range(601, 975)
# P3/T0 training mixtures whose datasets are licensed for reuse (see docs/intent.md).
T0_DATASETS = ("cnn_dailymail", "amazon_polarity", "commonsense_qa", "common_gen", "cosmos_qa", "quartz",
               "adversarial_qa", "dbpedia_14")  # fmt: skip
# reasoning-gym generators: logic stated in words, few or no numbers.
GYM_TASKS = {"knights_knaves": 45, "syllogism": 45, "zebra_puzzles": 25, "family_relationships": 30, "aiw": 30,
             "self_reference": 10, "propositional_logic": 10}  # fmt: skip

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell(n: int) -> str:
    """English words for 0 <= n < 1000."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens - 2] + ("-" + _ONES[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + (" " + spell(rest) if rest else "")


def numbers_as_words(text: str) -> str:
    """Spell out whole numbers below 1000 that stand alone ("$5" and "3.5" stay)."""
    return re.sub(r"(?<![\d.,$€£])\b(\d{1,3})\b(?![.,]\d)", lambda m: spell(int(m.group(1))), text)


def _row(prompt: str, label: str, source: str, note: str = "") -> dict[str, str]:
    row = {"prompt": prompt.strip(), "label": label, "source": source}
    if note:
        row["note"] = note
    return row


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def gsm8k(path: Path, rng: random.Random, skip: set[str], n: int) -> Iterator[dict[str, str]]:
    """GSM8K train questions; a third with their numbers spelled out."""
    rows = [r for r in _jsonl(path) if r["question"].strip() not in skip]
    for i, r in enumerate(rng.sample(rows, n)):
        if i % 3 == 0:
            yield _row(numbers_as_words(r["question"]), "reasoning", SOURCES[path.name], "numbers spelled out")
        else:
            yield _row(r["question"], "reasoning", SOURCES[path.name])


def mbpp_train(path: Path, rng: random.Random) -> Iterator[dict[str, str]]:
    """MBPP's train split in three shapes: bare task, task with its tests, docstring stub."""
    for r in _jsonl(path):
        if r["task_id"] not in MBPP_TRAIN_IDS:
            continue
        text = r["text"].strip()
        shape = rng.random()
        if shape < 0.4:
            prompt, note = text, "bare"
        elif shape < 0.6:
            prompt, note = text + "\nYour code should pass these tests:\n" + "\n".join(r["test_list"]), "with tests"
        else:
            header = next((ln for ln in r["code"].splitlines() if ln.lstrip().startswith("def ")), None)
            if header is None:
                continue
            prompt, note = f'{header.strip()}\n    """{text}\n    """\n', "docstring stub"
        yield _row(prompt, "code", SOURCES[path.name], f"task {r['task_id']}, {note}")


_FOLIO_TEMPLATES = (
    "{premises}\n\nBased on the statements above, is the following true, false, or uncertain? {conclusion}",
    "Premises:\n{premises}\nConclusion: {conclusion}\nDoes the conclusion follow from the premises?",
    "Given that {inline}, can we conclude that {conclusion_lc}",
)


def folio(path: Path, rng: random.Random, per_story: int = 1) -> Iterator[dict[str, str]]:
    """FOLIO train: premises in natural language and a conclusion to judge."""
    seen: dict[int, int] = {}
    for r in _jsonl(path):
        story = int(r["story_id"])
        if seen.get(story, 0) >= per_story:
            continue
        seen[story] = seen.get(story, 0) + 1
        premises = [p.strip() for p in r["premises"] if p.strip()]
        conclusion = r["conclusion"].strip()
        template = rng.choice(_FOLIO_TEMPLATES)
        prompt = template.format(
            premises="\n".join(premises),
            inline="; ".join(p.rstrip(".") for p in premises),
            conclusion=conclusion,
            conclusion_lc=conclusion[:1].lower() + conclusion[1:].rstrip(".") + "?",
        )
        yield _row(prompt, "reasoning", SOURCES[path.name], f"story {story}")


_CODE_OR_MATH = re.compile(
    r"\b(?:code|program|python|java|script|function|sql|calculate|solve|equation|probability|how many|riddle)\b", re.I
)


def gpteacher(path: Path, rng: random.Random, label: str, n: int) -> Iterator[dict[str, str]]:
    """GPTeacher instructions (+ input). Role-play rows that ask for code or math are skipped."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    if label == "general":
        rows = [r for r in rows if not _CODE_OR_MATH.search(r["instruction"] + " " + r.get("input", ""))]
    for r in rng.sample(rows, n):
        extra = r.get("input", "").strip()
        yield _row(r["instruction"] + ("\n" + extra if extra else ""), label, SOURCES[path.name])


def t0(folder: Path, rng: random.Random, per_dataset: int = 40) -> Iterator[dict[str, str]]:
    """P3/T0 training prompts: summaries, reviews, commonsense and reading questions."""
    for dataset in T0_DATASETS:
        files = sorted(folder.glob(dataset + "*.jsonl"))
        pool = [(f.stem, r["prompt"]) for f in files for r in _jsonl(f)[:200]]
        for stem, prompt in rng.sample(pool, min(per_dataset, len(pool))):
            yield _row(prompt, "general", SOURCES["t0"] + "/" + dataset, stem)


def reasoning_gym() -> Iterator[dict[str, str]]:
    """Logic puzzles from reasoning-gym's procedural generators (seeded)."""
    import reasoning_gym as rg

    for task, n in GYM_TASKS.items():
        for item in rg.create_dataset(task, size=n, seed=SEED):
            yield _row(str(item["question"]), "reasoning", REASONING_GYM, task)


def main(argv: list[str] | None = None) -> int:
    """Write the public-source rows (and optionally the generated ones)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, required=True, help="folder with the source files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dev", type=Path, default=Path("data/intent/dev.jsonl"), help="rows never to repeat")
    parser.add_argument("--generated", type=Path, help="also write reasoning-gym puzzles here")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    skip = {r["prompt"].strip() for r in _jsonl(args.dev)}
    rows = [
        *gsm8k(args.raw / "gsm8k_train.jsonl", rng, skip, 360),
        *mbpp_train(args.raw / "mbpp.jsonl", rng),
        *folio(args.raw / "folio_train.jsonl", rng),
        *gpteacher(args.raw / "gpteacher_codegen.json", rng, "code", 360),
        *gpteacher(args.raw / "gpteacher_roleplay.json", rng, "general", 300),
        *t0(args.raw / "t0", rng),
    ]
    rows = [r for r in rows if r["prompt"] not in skip]
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} public rows -> {args.out}")
    if args.generated:
        gen = list(reasoning_gym())
        args.generated.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gen), encoding="utf-8")
        print(f"{len(gen)} generated rows -> {args.generated}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
