"""`freeference classify`: show which intent a prompt routes to."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from router.intent import IntentResult, classify_request, classify_text, explain_request
from router.intent.explain import Evidence


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `classify` subcommand."""
    parser = subparsers.add_parser(
        "classify",
        help="classify a prompt as code, reasoning or general",
        description="Classify a prompt (or a JSONL file of prompts) by routing intent.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("prompt", nargs="?", help="the prompt text")
    source.add_argument(
        "--jsonl",
        type=Path,
        metavar="FILE",
        help="read lines with a `prompt` (or OpenAI `messages`) field; '-' for stdin",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also list the features that decided (they quote the prompt, unlike the header-safe reason)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point for the subcommand; returns the exit code."""
    if args.jsonl is None:
        if not args.explain:
            _print_result(classify_text(args.prompt))
            return 0
        result, features = explain_request([{"role": "user", "content": args.prompt}])
        _print_result(result)
        print("deciding features (from your prompt, so never put in headers or logs):")
        for item in features:
            print(f"  {item.margin:+.3f}  {_feature_text(item):<32} {item.group}")
        return 0
    if str(args.jsonl) == "-":
        return _run_jsonl(sys.stdin, sys.stdout)
    try:
        with args.jsonl.open(encoding="utf-8") as fh:
            return _run_jsonl(fh, sys.stdout)
    except OSError as exc:
        print(f"classify: cannot read {args.jsonl}: {exc.strerror}", file=sys.stderr)
        return 2


def _print_result(result: IntentResult) -> None:
    print(f"intent:     {result.intent}")
    print(f"confidence: {result.confidence:.2f}")
    print(f"reason:     {result.reason}")


def _feature_text(item: Evidence) -> str:
    name = item.feature
    if name.startswith("cue:"):
        return name
    if name.startswith("c:"):
        return f"chars {name[2:]!r}"
    if name.startswith("p:"):
        return f"stem {name[2:]!r}"
    if name.startswith("e:"):
        return f"meaning of {name[2:]!r}"
    words = " ".join("N" if w == "<num>" else w for w in name.removeprefix("^").split() if w != "<s>")
    return ("starts with " if name.startswith("^") else "") + repr(words)


def _run_jsonl(lines: TextIO, out: TextIO) -> int:
    """One output line per input line, in order; a bad line gets an `error` field."""
    status = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            result = _classify_row(row)
        except (ValueError, TypeError) as exc:
            print(json.dumps({"line": lineno, "error": str(exc)}), file=out)
            status = 1
            continue
        record = {"label": result.intent, "confidence": result.confidence, "reason": result.reason}
        if isinstance(row, Mapping) and "id" in row:
            record = {"id": row["id"], **record}
        print(json.dumps(record, ensure_ascii=False), file=out)
    return status


def _classify_row(row: Any) -> IntentResult:
    if not isinstance(row, Mapping):
        raise TypeError("each line must be a JSON object")
    messages = row.get("messages")
    if isinstance(messages, Sequence) and not isinstance(messages, str) and messages:
        if not all(isinstance(m, Mapping) for m in messages):
            raise TypeError("`messages` must be a list of objects")
        return classify_request(messages, has_tools=bool(row.get("tools")))
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise TypeError("line has neither a `prompt` string nor `messages`")
    return classify_text(prompt)
