"""The docs stand alone: no reference outside the repository or to issue numbers; links resolve."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "data").rglob("README.md")])
_OUTSIDE = re.compile(r"\.\./shared|/work/|\bshared/(notes|data)/|\b[Ii]ssue #?\d+")
_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_stands_alone(doc: Path) -> None:
    text = doc.read_text()
    outside = [m.group(0) for m in _OUTSIDE.finditer(text)]
    assert not outside, outside
    for target, _anchor in _LINK.findall(text):
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
