"""Property-based fuzzing of every public endpoint against the gateway's own OpenAPI schema.

Schemathesis generates valid and invalid requests from /openapi.json and checks each answer:
no 5xx, status codes and bodies that the schema declares, the declared content types. Bounded
(a few examples per operation, a deadline) so it runs in CI against real processes.
"""

from typing import Any

import pytest

# A dev dependency (schemathesis 4.x, which brings hypothesis); skipped where it is not installed.
pytest.importorskip("schemathesis")

import hypothesis
import schemathesis
from schemathesis.checks import positive_data_acceptance

from tests.support.processes import Gateway

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_key(shared_gateway: Gateway) -> str:
    return shared_gateway.create_key("pro", name="fuzz")


def _has_integral_float(value: Any) -> bool:
    """JSON Schema calls 18.0 an integer; OpenAI and the gateway refuse a decimal for an integer field,
    so such a request may be rejected even though the schema accepts it."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    return False


def _refusal_is_explained(case: schemathesis.Case, body: Any) -> bool:
    """A schema-valid request may get a 400 only for what a JSON Schema cannot say."""
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    return (_has_integral_float(case.body)
            or code == "context_length_exceeded"  # too long for every model in the catalog
            or code == "unsupported_capability"  # needs what no model of the catalog has (image input)
            or code == "no_messages"  # a Responses input of reasoning items alone: nothing to answer
            or (case.method.upper(), case.operation.path) == ("POST", "/v1/files"))  # JSONL needs a line


def _operations(gateway: Gateway) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(gateway.base_url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_endpoint_honours_its_schema(shared_gateway: Gateway, fuzz_key: str) -> None:
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    failures: dict[str, str] = {}
    operations = _operations(shared_gateway)
    assert len(operations) >= 5
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
        def fuzz(case: schemathesis.Case) -> None:
            # Schemathesis' own "schema-valid request rejected" check is replaced by _refusal_is_explained.
            response = case.call_and_validate(base_url=shared_gateway.base_url, headers=headers, timeout=15,
                                              excluded_checks=[positive_data_acceptance])
            assert response.status_code != 400 or _refusal_is_explained(case, response.json()), response.text

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # per operation, so one report names every offender
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}: {why}" for label, why in failures.items())
