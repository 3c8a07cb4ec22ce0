"""docker-compose.yml, checked without Docker (none runs here): commands parse, variables exist, paths resolve."""

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import build_parser
from settings import Settings
from settings.catalog import load_catalog
from settings.config import DEFAULT_CATALOG

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def test_the_file_says_it_is_unverified() -> None:
    assert "UNVERIFIED" in (REPO / "docker-compose.yml").read_text().splitlines()[0]


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if s.get("command", [""])[0] == "freeference"])
def test_freeference_commands_parse(name: str) -> None:
    build_parser().parse_args(SERVICES[name]["command"][1:])


def test_every_freeference_variable_is_a_setting() -> None:
    names = set(re.findall(r"\bFREEFERENCE_([A-Z_]+)\b", (REPO / "docker-compose.yml").read_text()))
    names -= {"DEMO_UPSTREAM_URL"}  # read by the demo catalog (base_url_env), not by Settings
    assert names and names <= {field.upper() for field in Settings.model_fields}


def test_the_workers_get_every_variable_the_default_catalog_reads() -> None:
    wanted = set()
    for provider in load_catalog(DEFAULT_CATALOG).providers:
        wanted |= set(provider.api_keys_env) | ({provider.base_url_env} if provider.base_url_env else set())
    assert wanted <= set(SERVICES["worker"]["environment"])


def test_the_demo_profile_runs_the_simulated_provider_and_the_demo_catalog() -> None:
    demo = {n: s for n, s in SERVICES.items() if "demo" in s.get("profiles", [])}
    assert set(demo) == {"demo-provider", "demo-worker", "demo-api"}
    assert "--demo" in demo["demo-provider"]["command"]
    catalog = demo["demo-worker"]["environment"]["FREEFERENCE_CATALOG"]
    assert (REPO / catalog.removeprefix("/app/")).is_file()
    assert demo["demo-api"]["environment"] == demo["demo-worker"]["environment"]
    # The documented commands name services that exist.
    for line in (REPO / "docker-compose.yml").read_text().splitlines():
        if line.startswith("#   docker compose"):
            words = shlex.split(line.removeprefix("#   "))
            named = [w for w in words if w in SERVICES or w.startswith("demo-")]
            assert all(w.split("=")[0] in SERVICES for w in named), line
