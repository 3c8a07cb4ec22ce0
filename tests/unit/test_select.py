"""Ranking: capability filters, learned windows, spreading within the score band, and why candidates were left out."""

import random
from collections import Counter

import pytest

from router import capabilities, why
from router.catalog import Deployment, RuntimeCatalog
from router.health import HealthSnapshot, KeyState, key_fingerprint, now_ms
from router.keyspace import DeploymentHealth
from router.select import NotCapable, NothingFits, rank
from settings.catalog import CatalogFile

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
IMAGE = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]


def catalog(*models: tuple[str, float, list[str]], lacks: dict[str, list[str]] | None = None) -> dict[str, Deployment]:
    file = CatalogFile.model_validate({
        "providers": [{"id": "p", "base_url": "http://up/v1", "api_keys_env": ["K"], "profile": {"limits": {
            "scope": "model"}}}],
        "models": [{"id": m, "provider": "p", "upstream_name": m, "context_window": 8000, "capabilities": caps,
                    "lacks": (lacks or {}).get(m, []), "scores": {"general": score}} for m, score, caps in models],
        "capabilities": {"text-basic": {"name": "G", "intent": "general"}},
    })
    return {d.model.id: d for d in RuntimeCatalog.build(file, {"K": "key"}).deployments}


@pytest.mark.parametrize(("body", "needs"), [
    ({"messages": []}, ()),
    ({"tools": TOOLS, "tool_choice": "auto"}, ("tools",)),
    ({"messages": IMAGE}, ("vision",)),
    ({"response_format": {"type": "json_object"}}, ("json",)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, ("structured_outputs",)),
    ({"response_format": {"type": "text"}, "tools": TOOLS, "messages": IMAGE}, ("tools", "vision")),
])
def test_what_a_request_needs(body: dict[str, object], needs: tuple[str, ...]) -> None:
    assert capabilities.required(body) == needs


def test_tools_and_images_need_a_declared_capability_json_is_assumed_unless_known_lacking() -> None:
    d = catalog(("plain", 0.9, ["chat"]), ("tooled", 0.8, ["chat", "tools", "vision"]),
                ("nojson", 0.7, ["chat"]), lacks={"nojson": ["json", "structured_outputs"]})
    fresh, now = DeploymentHealth(), now_ms()
    assert not capabilities.has(d["plain"], "tools", fresh, now) and capabilities.has(d["tooled"], "tools", fresh, now)
    assert capabilities.has(d["plain"], "json", fresh, now) and capabilities.has(d["plain"], "structured_outputs",
                                                                                   fresh, now)
    assert not capabilities.has(d["nojson"], "json", fresh, now)
    marked = DeploymentHealth(unsupported={"tools": now + 60_000})
    assert not capabilities.has(d["tooled"], "tools", marked, now)  # it said so: shared, until the mark lapses
    assert capabilities.has(d["tooled"], "tools", DeploymentHealth(unsupported={"tools": now - 1}), now)


def test_candidates_without_a_needed_feature_are_left_out_and_named() -> None:
    d = catalog(("plain", 0.9, ["chat"]), ("tooled", 0.8, ["chat", "tools"]))
    snap = HealthSnapshot(at_ms=now_ms())
    ranking = rank([[d["plain"], d["tooled"]]], "general", snap, 10, features=("tools",))
    assert ranking.candidates == [d["tooled"]]
    assert [(s.deployment, s.reason) for s in ranking.skipped] == [("p/plain", "capability:tools")]
    with pytest.raises(NotCapable) as info:
        rank([[d["plain"], d["tooled"]]], "general", snap, 10, features=("tools", "vision"))
    assert info.value.features == ["vision"]  # the one nobody has
    assert capabilities.describe(info.value.features) == ("image input (image_url content parts)", "messages")


def test_a_window_the_provider_stated_is_routed_by_until_it_lapses() -> None:
    d = catalog(("big", 0.9, ["chat"]), ("other", 0.8, ["chat"]))
    now = now_ms()
    snap = HealthSnapshot(at_ms=now, deployments={"p/big": DeploymentHealth(window_tokens=4096,
                                                                             window_until_ms=now + 60_000)})
    ranking = rank([[d["big"], d["other"]]], "general", snap, 6000)
    assert ranking.candidates == [d["other"]] and ranking.skipped[0].reason == "window"
    snap.deployments["p/big"] = DeploymentHealth(window_tokens=4096, window_until_ms=now - 1)
    assert rank([[d["big"], d["other"]]], "general", snap, 6000).candidates[0] == d["big"]
    with pytest.raises(NothingFits):
        rank([[d["big"], d["other"]]], "general", snap, 9000)


def _firsts(deployments: list[Deployment], snap: HealthSnapshot, band: float, draws: int = 400) -> Counter[str]:
    rng = random.Random(7)
    return Counter(rank([deployments], "general", snap, 10, band=band, rng=rng).candidates[0].model.id
                   for _ in range(draws))


def test_equivalent_candidates_share_the_traffic_and_lower_scores_keep_out_of_it() -> None:
    d = catalog(("a", 0.90, ["chat"]), ("b", 0.88, ["chat"]), ("c", 0.86, ["chat"]), ("d", 0.70, ["chat"]))
    group = list(d.values())
    snap = HealthSnapshot(at_ms=now_ms())
    firsts = _firsts(group, snap, band=0.05)
    assert set(firsts) == {"a", "b", "c"}  # d is out of the band
    assert min(firsts.values()) > 80  # none is starved (400 draws, 3 ways)
    assert _firsts(group, snap, band=0.0) == Counter({"a": 400})  # no band: always the best
    ranked = rank([group], "general", snap, 10, band=0.05, rng=random.Random(1)).candidates
    assert ranked[-1] == d["d"] and sorted(x.model.id for x in ranked[:3]) == ["a", "b", "c"]  # failover order stays


def test_spreading_prefers_quota_headroom_then_fewer_requests_in_flight() -> None:
    d = catalog(("a", 0.9, ["chat"]), ("b", 0.9, ["chat"]))
    fingerprint = key_fingerprint("key")
    snap = HealthSnapshot(at_ms=now_ms(), keys={("p", fingerprint): KeyState(model_quota={"a": (2, 20)})})
    assert _firsts(list(d.values()), snap, band=0.05) == Counter({"b": 400})  # a has 10 % left, b all of it
    busy = rank([list(d.values())], "general", HealthSnapshot(at_ms=now_ms()), 10, band=0.05,
                rng=random.Random(3), inflight={"p/a": 5}).candidates
    assert busy[0] == d["b"]


def test_a_recovering_deployment_in_the_band_is_probed_first() -> None:
    d = catalog(("a", 0.9, ["chat"]), ("b", 0.9, ["chat"]), ("c", 0.88, ["chat"]))
    now = now_ms()
    snap = HealthSnapshot(at_ms=now, deployments={"p/c": DeploymentHealth(open_until_ms=now - 1, cooldown_ms=5000)})
    assert _firsts(list(d.values()), snap, band=0.05) == Counter({"c": 400})


def test_the_route_line_names_what_was_passed_over_and_why() -> None:
    d = catalog(("plain", 0.9, ["chat"]), ("tooled", 0.8, ["chat", "tools"]), ("low", 0.5, ["chat"]))
    now = now_ms()
    snap = HealthSnapshot(at_ms=now, deployments={"p/tooled": DeploymentHealth(open_until_ms=now + 9000)})
    group = list(d.values())
    ranking = rank([group], "general", snap, 10)
    # tooled (breaker) ranks above low, which serves after the best one failed.
    line = why.summary(ranking.skipped, [("p/plain", "failed:server_error")], ranking.groups, "p/low", 0.5)
    assert line == "p/tooled=breaker, p/plain=failed:server_error"
    # Candidates scoring below the one that served are not named.
    assert why.summary(ranking.skipped, [], ranking.groups, "p/plain", 0.9) == ""
    crowded = [("p/m" + "x" * i, "failed:timeout") for i in range(9)]
    assert why.summary([], crowded, {}, "p/z", 0.1).endswith(", +3 more")
