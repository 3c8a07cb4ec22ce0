"""Settings refuse unsafe production defaults; catalogs fail with errors that name the problem."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from settings import Settings
from settings.catalog import CatalogError, load_catalog
from settings.config import DEFAULT_CATALOG, DEMO_CATALOG


def test_production_requires_a_strong_master_key() -> None:
    with pytest.raises(ValidationError, match="MASTER_KEY"):
        Settings(environment="production", master_key=None)
    with pytest.raises(ValidationError, match="MASTER_KEY"):
        Settings(environment="production", master_key="short")
    assert Settings(environment="production", master_key="x" * 32).environment == "production"


@pytest.mark.parametrize("path", [DEFAULT_CATALOG, DEMO_CATALOG])
def test_shipped_catalogs_validate(path: Path) -> None:
    catalog = load_catalog(path)
    assert {"text-basic", "code", "reasoning"} <= set(catalog.capabilities)
    assert all(m.provider in {p.id for p in catalog.providers} for m in catalog.models)


@pytest.mark.parametrize(("text", "fragment"), [
    ("providers: [", "not valid YAML"),
    ("providers: []\nmodels: []\n", "capabilities"),
    ("providers: [{id: a, base_url: 'http://x'}]\nmodels: [{id: m, provider: b, upstream_name: m, "
     "context_window: 1}]\ncapabilities: {}\n", "unknown provider"),
    ("providers: [{id: a, base_url: 'http://x', bogus: 1}]\nmodels: []\ncapabilities: {}\n", "bogus"),
])
def test_broken_catalog_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=fragment):
        load_catalog(path)


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "nope.yaml")
