"""Turn a prompt into sparse features: lexical n-grams plus hand-made cues.

Pure Python and deterministic: feature names are strings (never `hash()`, which is
salted per process), so the same prompt yields the same features everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from router.intent.lexicon import CODE_PHRASES, CODE_WORDS, KIN_WORDS, MATH_PHRASES, MATH_TERMS, TECH_NAMES

# Long prompts are cut to a head and a tail window: the instruction usually sits at
# the start or the end (a pasted table or log in the middle adds little), and the cut
# keeps the cost per request bounded whatever the caller sends.
HEAD_CHARS = 1000
TAIL_CHARS = 300
# Bounds on the lexical features, for the same reason.
TOKEN_HEAD_CHARS = 700
TOKEN_TAIL_CHARS = 200
MAX_TOKENS = 160
MAX_CHARGRAM_WORDS = 40
# Past this many characters a prompt usually pastes material (an article, a log).
LONG_CHARS = 600

# Tokens: identifiers/words (any script), numbers, single CJK/kana/hangul characters
# (those scripts put no spaces between words) and the operators that mark code or math.
# A word stops where CJK text starts: in "用Python写一个函数" the token is "python",
# not "python写一个函数", so the tech name is seen.
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af"
_TOKEN_RE = re.compile(
    rf"[{_CJK}]"
    rf"|[^\W\d{_CJK}][^\W{_CJK}]*"
    r"|\d+(?:[.,]\d+)*"
    r"|==|!=|<=|>=|->|=>|::|\+\+|&&|\|\||\*\*"
    r"|[{}()\[\];=<>+\-*/^%$#@!?|&~`\\:\"']"
)
_MATH_PHRASES_ASCII = tuple(p for p in MATH_PHRASES if p.isascii())
_CODE_PHRASES_ASCII = tuple(p for p in CODE_PHRASES if p.isascii())
# Tech names the tokenizer splits apart ("c#" -> "c", "#").
_SYMBOL_TECH_RE = re.compile(r"(?<![\w.])(?:c\+\+|c#|f#|\.net|node\.js|vue\.js|next\.js|asp\.net)(?!\w)")
# Quantified statements ("all poets are dreamers", "no A is B"): two or more of them
# make a syllogism or logic puzzle, reasoning without a single number.
_QUANTIFIED_RE = re.compile(
    r"\b(?:all|no|some|every|none of the|todos los|tous les|alle|nessun|все|некоторые)\s+"
    r"\w+(?:\s\w+)?\s+(?:are|is|can|have|like|son|sont|sind|sono|—)\b"
)
# Premises of a deduction start a sentence or line with a quantifier or a condition
# ("All monitors ...", "If it rains, ...", "Either the butler or ..."): several of
# them make a logic puzzle even when no quantified statement is as tidy as the above.
_PREMISE_RE = re.compile(
    r"(?:^|[.;:!?]\s+|\n\s*(?:[-*\d.)]+\s*)?)(?:all|no|some|every|each|any|none|if|either|neither|nobody|"
    r"no one|everyone|everybody|anyone|only|whenever|unless)\b",
    re.MULTILINE,
)
# A statement: a short declarative clause on a line of its own or between semicolons
# ("Avon is a county.", "Kora was filmed by Lux"). A list of them
# followed by a question is how premises are given, whatever they are about.
_STATEMENT_SPLIT_RE = re.compile(r"\n|;\s")
_STATEMENT_VERB_RE = re.compile(r"\b(?:is|are|was|were|has|have|had|can|cannot|does|do|did|will|must|should|may|not)\b")
# Multiple-choice options "A) .. B) .." (MMLU, AQuA style exams).
_CHOICE_RE = re.compile(r"([A-E])[).]\s")


@dataclass(frozen=True, slots=True)
class Cue:
    """A yes/no signal. `needles` (lower-case substrings, any of which must occur) is
    a cheap prefilter: most prompts skip the regex scan altogether. Without a
    pattern, a needle alone fires the cue."""

    name: str
    needles: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    case_sensitive: bool = False
    # Run the pattern on the lower-cased text (cheaper than re.IGNORECASE).
    on_lowered: bool = False


_FILE_EXTS = (
    "py|js|jsx|ts|tsx|java|kt|go|rs|rb|php|cs|cpp|cc|hpp|c|h|swift|scala|sh|bash|ps1|sql"
    "|yaml|yml|toml|json|ini|cfg|lock|gradle|tf|vue|svelte|ipynb|md|html|css|scss|env"
)

# Each cue fires at most once; the model learns its weight like any other feature.
CUES: tuple[Cue, ...] = (
    Cue("code_fence", ("```", "~~~")),
    # Literal error markers, case-sensitive ("Error:" in a log, not "error" in prose).
    Cue(
        "traceback",
        (
            "Traceback (most recent",
            "Exception in thread",
            "Error:",
            "Exception:",
            "Errno",
            "panicked at",
            "egmentation fault",
            "core dumped",
            "error[E",
            "npm ERR!",
            "FAILED",
            "error:",
            "ERROR",
            "\n    at ",
            "\n\tat ",
            "Warning:",
            "Uncaught ",
        ),
        case_sensitive=True,
    ),
    Cue("file_name", (".",), re.compile(rf"\.(?:{_FILE_EXTS})\b|dockerfile\b"), on_lowered=True),
    Cue(
        "code_line",
        (),
        re.compile(
            r"^\s*(?:def |class |import |from \w+ import|#include|using namespace|public |private "
            r"|function |const |let |var |fn |func |package |return |if \(|for \(|while \(|SELECT "
            r"|INSERT |UPDATE \w+ SET|CREATE TABLE|@\w+|\$ |>>> |sudo |pip |npm |git |docker |kubectl )",
            re.MULTILINE,
        ),
    ),
    Cue(
        "code_punct",
        (";", "{", "}", "=>", "->", "::", "()", "[]"),
        re.compile(r"[;{}]\s*$|\)\s*\{|=>|->|::|\(\)|\[\]", re.MULTILINE),
    ),
    Cue("method_call", (".",), re.compile(r"\.[a-zA-Z_]\w*\(")),
    Cue("snake_case", ("_",), re.compile(r"[a-z0-9]_[a-z0-9]")),
    Cue("camel_case", (), re.compile(r"[a-z][A-Z][a-z]")),
    Cue("html_tag", ("<",), re.compile(r"</?[a-zA-Z][\w-]*(?:\s[^<>]*)?>")),
    Cue("assert_test", ("assert",), re.compile(r"\bassert\b.*==")),
    Cue("indented_block", ("\n    ", "\n\t"), re.compile(r"(?:^(?: {4}|\t)\S.*\n){2,}", re.MULTILINE)),
    Cue(
        "latex",
        ("\\", "$"),
        re.compile(
            r"\\(?:frac|sqrt|int|sum|prod|lim|cdot|times|leq|geq|mathbb|binom|pi|theta|alpha)\b"
            # $...$ with a TeX-ish character inside, so "$20 and $30" is not math mode.
            r"|\$[^$\n]*[\\^_{}=][^$\n]*\$"
        ),
    ),
    Cue("math_symbol", tuple("∑∫√≤≥≠±×÷∞∈∀∃⇒∴πθ²³½¼¾")),
    # "= 5", "^2", "**3", "3 =": each alternative starts with a literal or a digit, so
    # the scan stays cheap on long prompts.
    Cue("equation", ("=", "^", "**"), re.compile(r"[=^]\s?-?\d|\*\*\s?\d|\d\s?=")),
    Cue("arith", ("+", "-", "*", "/", "×", "÷", "^"), re.compile(r"\d\s*[+\-*/×÷^]\s*\d")),
    Cue("percent", ("%", "percent", "per cent", "porcentaje", "prozent", "pourcentage")),
    Cue(
        "money",
        ("$", "€", "£", "¥", "dollar", "euro", "usd", "eur"),
        re.compile(r"[$€£¥]\s?\d|\d\s?(?:€|dollars|euros|USD|EUR)\b", re.IGNORECASE),
    ),
    Cue("pipe_table", ("|",), re.compile(r"^\s*\|.*\|.*\|", re.MULTILINE)),
    Cue("question", ("?", "？")),
    Cue("url", ("http://", "https://")),
)


def _fires(cue: Cue, text: str, lowered: str) -> bool:
    haystack = text if cue.case_sensitive else lowered
    if cue.needles:
        for needle in cue.needles:
            if needle in haystack:
                break
        else:
            return False
    if cue.pattern is None:
        return True
    return cue.pattern.search(lowered if cue.on_lowered else text) is not None


# How many numbers a text holds, in bins: word problems carry several.
_NUM_BINS = ((0, "nums_0"), (1, "nums_1"), (3, "nums_2_3"), (8, "nums_4_8"))
_DENSITY_BINS = ((0.03, "numdens_low"), (0.08, "numdens_mid"))
_LEN_BINS = ((20, "len_xs"), (60, "len_s"), (200, "len_m"), (1000, "len_l"))


@dataclass(frozen=True, slots=True)
class Features:
    """Lexical features (weighted by 1/sqrt(n)) and cue features (weight 1)."""

    lexical: tuple[str, ...]
    cues: tuple[str, ...]
    # Where the lexical groups end in `lexical`: words and word pairs, then opening
    # words, then word pieces; the model sums each group apart for `reason`.
    group_ends: tuple[int, int]


def window(text: str) -> str:
    """Bound a prompt to its head and tail, so cost stays linear with a cap."""
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n...\n" + text[-TAIL_CHARS:]


def tokens(text: str) -> list[str]:
    """Lower-cased tokens with numbers folded to one symbol."""
    lowered = text.lower()
    if len(lowered) > TOKEN_HEAD_CHARS + TOKEN_TAIL_CHARS:
        # The end of a long prompt often holds the actual question; keep some of it.
        found = _TOKEN_RE.findall(lowered, 0, TOKEN_HEAD_CHARS)[:MAX_TOKENS]
        found += _TOKEN_RE.findall(lowered, len(lowered) - TOKEN_TAIL_CHARS)[-MAX_TOKENS // 3 :]
    else:
        found = _TOKEN_RE.findall(lowered)[:MAX_TOKENS]
    return ["<num>" if tok[0].isdigit() else tok for tok in found]


def extract(text: str) -> Features:
    """Features of one prompt (windowed first)."""
    text = window(text)
    toks = tokens(text)
    # A dict is an insertion-ordered set: the summation order, and so every float,
    # is the same in every process (a set's order depends on the hash seed).
    lexical: dict[str, None] = dict.fromkeys(toks)
    words = list(lexical)
    lexical.update(dict.fromkeys(a + " " + b for a, b in zip(["<s>", *toks], toks, strict=False)))
    # The first two words carry the request type ("write a", "how many", "what is").
    n_wording = len(lexical)
    lexical.update(dict.fromkeys("^" + tok for tok in toks[:2]))
    n_opening = len(lexical)
    # Crude stems and character 4-grams: inflections, typos and cognates across
    # languages ("function", "función", "Funktion") share them.
    padded = ["_" + w + "_" for w in words if len(w) > 4][:MAX_CHARGRAM_WORDS]
    lexical.update(dict.fromkeys(["p:" + p[1:6] for p in padded]))
    lexical.update(dict.fromkeys(["c:" + p[i : i + 4] for p in padded for i in range(len(p) - 3)]))

    lowered = text.lower()
    cues = [cue.name for cue in CUES if _fires(cue, text, lowered)]
    word_set = set(words)
    n_tech = len(word_set & TECH_NAMES)
    if any(n in lowered for n in ("c#", "c++", "f#", ".net", ".js")):
        n_tech += len(_SYMBOL_TECH_RE.findall(lowered))
    cues.extend(_count_cue("tech", n_tech))
    cues.extend(_count_cue("codeword", len(word_set & CODE_WORDS)))
    # Most prompts are ASCII: the other scripts' phrases need not be looked for.
    math_phrases, code_phrases = (
        (_MATH_PHRASES_ASCII, _CODE_PHRASES_ASCII) if lowered.isascii() else (MATH_PHRASES, CODE_PHRASES)
    )
    n_math = len(word_set & MATH_TERMS) + sum(1 for p in math_phrases if p in lowered)
    cues.extend(_count_cue("mathword", n_math))
    if any(p in lowered for p in code_phrases):
        cues.append("code_phrase")
    # Logic puzzles state their premises up front; the head is enough.
    if len(_QUANTIFIED_RE.findall(lowered, 0, 800)) >= 2:
        cues.append("quantified")
    n_premises = len(_PREMISE_RE.findall(lowered, 0, 1000))
    if n_premises >= 2:
        cues.append("premises_2plus")
        if n_premises >= 4:
            cues.append("premises_4plus")
    # Counted on the tokens, which costs next to nothing (a regex over the text cost
    # up to 0.05 ms).
    if sum(1 for tok in toks if tok in KIN_WORDS) >= 3:
        cues.append("kinship")
    n_statements = _statements(lowered[:HEAD_CHARS])
    if n_statements >= 3:
        cues.append("statements_3plus")
        if n_statements >= 5:
            cues.append("statements_5plus")
    if len(set(_CHOICE_RE.findall(text))) >= 3:
        cues.append("choices")
    n_nums = toks.count("<num>")
    cues.append(next((n for lim, n in _NUM_BINS if n_nums <= lim), "nums_many"))
    # A word problem is dense with numbers; an article or a review that happens to
    # hold many is not.
    if n_nums:
        density = n_nums / len(toks)
        cues.append(next((n for lim, n in _DENSITY_BINS if density <= lim), "numdens_high"))
    if len(text) > LONG_CHARS:
        # In a long prompt a question mark or a math word may sit in a pasted article or
        # review; the model learns separate weights for cues seen in long prompts.
        cues.extend([c + "@long" for c in cues])
    cues.append(next((n for lim, n in _LEN_BINS if len(text) <= lim), "len_xl"))
    return Features(lexical=tuple(lexical), cues=tuple(cues), group_ends=(n_wording, n_opening))


def _statements(head: str) -> int:
    """How many lines or semicolon-separated clauses read as short statements."""
    if head.count("\n") + head.count(";") < 2:
        return 0
    n = 0
    for clause in _STATEMENT_SPLIT_RE.split(head):
        clause = clause.strip()
        if clause and not clause.endswith(("?", ":")) and 3 <= clause.count(" ") + 1 <= 30:
            n += _STATEMENT_VERB_RE.search(clause) is not None
    return n


def _count_cue(name: str, n: int) -> list[str]:
    if n == 0:
        return []
    return [f"{name}_1"] if n == 1 else [f"{name}_1", f"{name}_2plus"]
