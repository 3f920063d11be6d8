"""Property-based fuzzing of every operation in the server's OpenAPI document (schemathesis) against a real
`tuneforge server` on SQLite and PostgreSQL: no 500, no traceback or server path in any answer, every
documented answer in its schema. A fixed seed and a bounded number of examples per operation
(TUNEFORGE_FUZZ_EXAMPLES, default 3, as valid and as invalid input) keep it within the default run's budget."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from conftest import ServerProcess  # noqa: E402
from hypothesis import HealthCheck, seed, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

EXAMPLES = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "3"))
LEAKS = ("Traceback", 'File "/', "site-packages")  # and the server's home, below


@pytest.fixture
def fuzzed_server(tmp_path, database_url, monkeypatch):
    # A rate the fuzzer never reaches: it exercises the API, not the limiter.
    monkeypatch.setenv("TUNEFORGE_RATE_LIMIT_PER_MINUTE", "1000000")
    monkeypatch.setenv("TUNEFORGE_RATE_LIMIT_BURST", "1000000")
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield server
    server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()[-4000:]


def test_no_operation_fails_or_leaks_on_generated_input(fuzzed_server):
    """Every operation, EXAMPLES generated valid requests and as many invalid ones. The
    tenant's key (read, jobs, files): admin operations answer 403 and are fuzzed up to the scope check."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {fuzzed_server.keys['tenant-a']}"}
    leaks = (*LEAKS, str(fuzzed_server.home))
    counts: dict[str, int] = {}
    no_negative: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 40, len(operations)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @seed(20261201)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call_and_validate(headers=headers, checks=[not_a_server_error, response_schema_conformance])
                assert not [leak for leak in leaks if leak in response.text], (operation.label, response.text[:2000])
                key = f"{response.status_code // 100}xx"
                counts[key] = counts.get(key, 0) + 1

            try:
                fuzz()
            except Unsatisfiable:
                # Nothing to make invalid (an operation without parameters or body).
                assert mode is GenerationMode.NEGATIVE, operation.label
                no_negative.append(operation.label)
    print(f"fuzzed {len(operations)} operations: {sum(counts.values())} requests, by status {sorted(counts.items())}; "
          f"no invalid input possible for {len(no_negative)}: {no_negative}")
    assert "5xx" not in counts
