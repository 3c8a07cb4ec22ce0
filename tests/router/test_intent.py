"""Intent classification: labels on varied prompts, request handling, determinism."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.classify import register
from router.intent import IntentResult, classify_request, classify_text, explain_request
from router.intent.explain import PHRASES
from router.intent.features import HEAD_CHARS, TAIL_CHARS, extract, window
from router.intent.model import Model, default_model
from router.intent.train import Example, TrainConfig, fit

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        # short greetings and chit-chat
        ("hi", "general"),
        ("Good evening! How are you today?", "general"),
        ("thanks!", "general"),
        # code words in requests that are not for code
        ("Write a limerick about a cat who learns JavaScript", "general"),
        ("Make me a study outline for learning Java over the summer", "general"),
        ("Write a wedding toast for two software engineers who met at a Python meetup", "general"),
        # code, including terse and debugging asks
        ("Write a Python function that reverses a linked list", "code"),
        ("Traceback (most recent call last):\n  File \"app.py\", line 3\nKeyError: 'id'\nwhat's wrong?", "code"),
        ("SQL to find duplicate emails in a users table", "code"),
        ("how do I squash my last 3 git commits", "code"),
        ("Write a program that solves quadratic equations", "code"),
        # reasoning with and without numbers
        ("A shirt costs $40 after a 20% discount. What was the original price?", "reasoning"),
        ("All poets are dreamers. No dreamers are accountants. Can a poet be an accountant?", "reasoning"),
        ("Prove that the sum of the first n odd numbers is n squared.", "reasoning"),
        ("What is the probability of drawing two aces from a deck without replacement?", "reasoning"),
        # premises stated line by line are logic whatever they are about; a list of
        # facts that asks for writing is not
        (
            "Mort is a stamp collector.\nMort lives in Oslo.\nEvery stamp collector in Oslo owns a magnifier.\n"
            "Does Mort own a magnifier?",
            "reasoning",
        ),
        (
            "Our team is five people.\nWe meet on Mondays.\nThe office is in Leeds.\n"
            "Write a friendly welcome email for a new hire.",
            "general",
        ),
        # STEM explanation without computation is general
        ("Explain what photosynthesis is in simple terms", "general"),
        # other languages
        ("Escribe una función en JavaScript que invierta una cadena.", "code"),
        ("Combien font 15 % de 240 ? Explique le calcul.", "reasoning"),
        ("Kannst du mir ein Rezept für Pfannkuchen geben?", "general"),
        ("用Python写一个快速排序函数", "code"),
    ],
)
def test_classify_text_labels(prompt: str, expected: str) -> None:
    result = classify_text(prompt)
    assert result.intent == expected, result


def test_result_shape() -> None:
    result = classify_text("Write a bash script that backs up /etc")
    assert isinstance(result, IntentResult)
    assert 1 / 3 <= result.confidence <= 1.0
    assert result.reason and isinstance(result.reason, str)


def _user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        # the last user turn decides when it is clear
        (
            [
                _user("Write a haskell function for fibonacci"),
                {"role": "assistant", "content": "fib n = ..."},
                _user("Thanks! Now write a short poem about autumn leaves for my mother."),
            ],
            "general",
        ),
        # a short follow-up inherits its context
        (
            [
                _user("Write a Python function that parses ISO dates."),
                {"role": "assistant", "content": "```python\ndef parse(s):\n    return datetime.fromisoformat(s)\n```"},
                _user("now do it in Go"),
            ],
            "code",
        ),
        (
            [
                _user("A train leaves at 3pm at 60 km/h, another at 4pm at 90 km/h. When does the second catch up?"),
                {"role": "assistant", "content": "At 6pm."},
                _user("why?"),
            ],
            "reasoning",
        ),
        # the system prompt is context too
        (
            [
                {"role": "system", "content": "You are a patient math tutor. Solve each problem step by step."},
                _user("ok, and the second one?"),
            ],
            "reasoning",
        ),
        # content given as a list of parts, with an image
        (
            [
                _user(
                    [
                        {"type": "text", "text": "Write a caption for this photo of my dog at the beach"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/dog.png"}},
                    ]
                )
            ],
            "general",
        ),
    ],
)
def test_classify_request_messages(messages: list[dict[str, Any]], expected: str) -> None:
    assert classify_request(messages).intent == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("What's the weather in Paris today?", "general"),
        ("Fix the failing test in tests/test_app.py", "code"),
    ],
)
def test_tools_only_tip_close_calls(prompt: str, expected: str) -> None:
    assert classify_request([_user(prompt)], has_tools=True).intent == expected


def test_response_format_is_noted_not_decisive() -> None:
    result = classify_request(
        [_user("Extract the names of all people in: 'Ann met Bob in Rome.'")],
        response_format={"type": "json_object"},
    )
    assert result.intent == "general"
    assert "json output" in result.reason


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "You are helpful."}],
        [_user(None)],
        [_user("")],
        [{"role": "assistant", "content": "Hello, how can I help?"}],
    ],
)
def test_degenerate_requests_do_not_fail(messages: list[dict[str, Any]]) -> None:
    assert classify_request(messages).intent in ("code", "reasoning", "general")


def test_deterministic_within_process() -> None:
    prompt = "Given the table | 2023 | 2022 | Revenue | 120 | 100 |, what is the growth?"
    assert len({classify_text(prompt) for _ in range(5)}) == 1


def test_deterministic_across_processes() -> None:
    # Different hash seeds: features must not depend on Python's salted str hash.
    script = (
        "from router.intent import classify_text as c;"
        "print(repr(c('Prove that 17 is prime and write a C function to check primes')))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_long_prompt_is_windowed_and_classified() -> None:
    log = "2024-01-01 12:00:00 INFO request handled in 12ms\n" * 5000
    prompt = "Why does my Flask app crash? Here is the log:\n" + log + "Traceback: ValueError: bad"
    assert len(window(prompt)) <= HEAD_CHARS + TAIL_CHARS + 10
    assert classify_text(prompt).intent == "code"


def test_huge_prompt_features_are_bounded() -> None:
    small = extract("word " * 2_000)
    huge = extract("word " * 200_000)
    assert len(huge.lexical) == len(small.lexical)


def test_statement_lists_are_premises_in_any_vocabulary() -> None:
    listed = "Brill is a town in Avon.\nAvon is a county.\nNo towns are cities.\nIs Brill a city?"
    inline = (
        "Given that Kora was filmed by Lux; Kora is a comedy; Lux does not make comedies; can we conclude anything?"
    )
    prose = "I bought this kettle last year. It is loud and the lid sticks, but it boils fast. Would you recommend it?"
    assert "statements_3plus" in extract(listed).cues
    assert "statements_3plus" in extract(inline).cues
    assert "statements_3plus" not in extract(prose).cues


def test_model_round_trips_through_json() -> None:
    model = default_model()
    again = Model.from_json(model.to_json())
    assert again.bias == model.bias
    assert len(again.weights) == len(model.weights)


def test_fit_learns_a_toy_problem() -> None:
    rows = [Example("write a python function", "code"), Example("solve this equation", "reasoning")] * 10
    rows += [Example("tell me a story", "general")] * 10
    model = fit(rows, TrainConfig(epochs=5, min_count=1))
    scores = model.logits(extract("python function please"))
    assert scores.index(max(scores)) == 0


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="freeference")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


def test_cli_single_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["classify", "Write a Rust function that adds two numbers"], capsys)
    assert code == 0
    assert "code" in out and "confidence" in out and "reason" in out


def test_cli_jsonl_keeps_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        {"prompt": "hello there"},
        {"prompt": "What is 12% of 450?"},
        {"messages": [{"role": "user", "content": "write a Go http server"}]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    code, out = _cli(["classify", "--jsonl", str(path)], capsys)
    rows = [json.loads(line) for line in io.StringIO(out)]
    assert code == 0
    assert [r["label"] for r in rows] == ["general", "reasoning", "code"]
    assert all({"label", "confidence", "reason"} <= r.keys() for r in rows)


def test_cli_jsonl_reports_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "hi"}\nnot json\n{"nope": 1}\n', encoding="utf-8")
    code, out = _cli(["classify", "--jsonl", str(path)], capsys)
    rows = [json.loads(line) for line in io.StringIO(out)]
    assert code == 1
    assert rows[0]["label"] == "general"
    assert "error" in rows[1] and "error" in rows[2]


# A made-up token that no lexicon, cue name or reason phrase contains.
SENTINEL = "Qzxvkwsentinel"


@pytest.mark.parametrize(
    "messages",
    [
        [_user(f"Traceback (most recent call last):\n  File \"{SENTINEL}.py\", line 3\nKeyError: '{SENTINEL}'")],
        [_user(f"def {SENTINEL}_total(xs):\n    return sum(xs)\n\nwhy does {SENTINEL}_total fail on None?")],
        [_user(f"All {SENTINEL}s are razzies and no razzies are blue. Can a {SENTINEL} be blue?")],
        [_user(f"{SENTINEL} bought 3 apples at $2 each and 4 pears at $3 each. How much did {SENTINEL} spend?")],
        [_user(f"Write a birthday poem for my friend {SENTINEL}.")],
        [_user(SENTINEL)],
        [_user(f"{SENTINEL} {SENTINEL} {SENTINEL.lower()} {SENTINEL.upper()}")],
        [
            {"role": "system", "content": f"You are {SENTINEL}, a coding assistant."},
            _user(f"Fix the {SENTINEL} class"),
            {"role": "assistant", "content": f"class {SENTINEL}:\n    pass"},
            _user("and tests?"),
        ],
    ],
)
def test_reason_never_quotes_the_prompt(messages: list[dict[str, Any]]) -> None:
    for has_tools in (False, True):
        result = classify_request(messages, has_tools=has_tools, response_format={"type": "json_object"})
        assert SENTINEL.lower() not in result.reason.lower()
        # Stronger: the reason is the class plus phrases from a closed set, so no part
        # of any prompt (word, identifier or character n-gram) can reach the header.
        label, _, rest = result.reason.partition(": ")
        assert label == result.intent
        assert set(rest.split(" + ")) <= PHRASES, result.reason


def test_explain_lists_features_but_keeps_the_reason_header_safe(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(["classify", "--explain", f"KeyError: '{SENTINEL}' in {SENTINEL}.py, what's wrong?"], capsys)
    assert code == 0
    reason_line = next(line for line in out.splitlines() if line.startswith("reason:"))
    assert SENTINEL.lower() not in reason_line.lower()
    # The deciding features may quote the prompt: the user typed it into this terminal.
    assert "deciding features" in out and "stack-trace cue" in out


def test_explain_request_matches_classify_request() -> None:
    messages = [_user("Prove that the sum of two even numbers is even.")]
    result, features = explain_request(messages)
    assert result == classify_request(messages)
    assert features and all(f.margin > 0 for f in features)
    assert [f.margin for f in features] == sorted((f.margin for f in features), reverse=True)
