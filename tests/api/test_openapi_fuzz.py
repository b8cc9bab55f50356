"""Requests generated from the app's own /openapi.json by schemathesis, with every check it has: no 5xx,
only documented status codes, content types, headers and bodies, valid data accepted and invalid data
refused, the API key enforced where it is declared, 405 with an Allow header for undeclared methods and an
OPTIONS Allow header that lists the documented ones.

Schemathesis runs as ``st run --checks all`` would (its engine: examples, coverage, fuzzing and stateful
phases) against the ASGI app in process, rather than through its pytest plugin, whose lazy fixture loader
does not run under pytest 9. For a longer or another run, RETRIEVER_FUZZ_EXAMPLES sets the examples per
operation and phase, RETRIEVER_FUZZ_SEED the seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import StopReason, events, from_schema
from schemathesis.python.asgi import shutdown_lifespans

from retriever.api.app import create_app
from retriever.api.settings import Settings
from tests.api.conftest import API_KEY, GatedLoader, wait_ready

#: Examples per operation and phase: about a minute on two cores.
EXAMPLES = int(os.environ.get("RETRIEVER_FUZZ_EXAMPLES", "100"))
CONFIG: dict[str, Any] = {
    "checks": {"enabled": True},
    "generation": {"max-examples": EXAMPLES, "database": "none"},
    "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
    "seed": int(os.environ.get("RETRIEVER_FUZZ_SEED", "20240531")),
    "workers": 1,
    "cache": {"enabled": False},
    "operations": [
        {
            # Bytes that fit `format: binary` are hardly ever an image: the image search refuses them with
            # 422 (and oversized ones with 413), as documented, however well they fit the schema.
            "include-path": "/v1/search/image",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", 413, 422]}},
        }
    ],
}


def _failures(run: Iterable[events.EngineEvent]) -> tuple[list[str], dict[str, int], StopReason | None]:
    """The failed checks and engine errors of a run (one line each), the cases per operation, how it ended."""
    failures: list[str] = []
    cases: dict[str, int] = {}
    stop: StopReason | None = None
    for event in run:
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            cases[recorder.label] = cases.get(recorder.label, 0) + len(recorder.cases)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    interaction = recorder.interactions.get(case_id)
                    response = interaction.response if interaction is not None else None
                    answer = f"{response.status_code} {response.content[:300]!r}" if response else "no answer"
                    failures.append(
                        f"{recorder.label}: {check.name}: {check.failure_info.failure.title}\n"
                        f"    {check.failure_info.failure.message.splitlines()[0]}\n"
                        f"    {check.failure_info.code_sample[:500]}\n    -> {answer}"
                    )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"engine error: {event}")
        elif isinstance(event, events.EngineFinished):
            stop = event.stop_reason
    return sorted(set(failures)), cases, stop


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """One backend is enough here; the endpoint tests cover both."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.mark.slow
def test_the_api_keeps_to_its_schema(
    indexed: Path, make_settings: Callable[..., Settings], loader: GatedLoader
) -> None:
    app = create_app(make_settings(api_key=API_KEY), loader=loader)
    # Schemathesis starts the app's lifespan (the runtime) itself and keeps it until shut down.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
    try:
        wait_ready(TestClient(app))
        # Random ids seldom hit an image, so the answers for an existing one are checked once on purpose
        # (first: the fuzzing may delete them).
        for path in (
            "/v1/images/{image_id}",
            "/v1/images/{image_id}/thumbnail",
            "/v1/images/{image_id}/file",
        ):
            case = schema[path]["GET"].Case(path_parameters={"image_id": 1})
            assert case.call_and_validate().status_code == 200
        started = time.monotonic()
        failures, cases, stop = _failures(from_schema(schema).execute())
        elapsed = time.monotonic() - started
    finally:
        shutdown_lifespans()
    assert not failures, f"{len(failures)} schemathesis failures:\n" + "\n".join(failures)
    assert stop is StopReason.COMPLETED, stop
    loaded = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    operations = {f"{o.method.upper()} {o.path}" for o in loaded}
    assert len(operations) >= 12 and operations <= set(cases), sorted(operations - set(cases))
    assert "Stateful tests" in cases, "no stateful run: the links between operations were not found"
    # It is in the normal test run: a few minutes at most (it takes about one).
    assert elapsed < 180 * max(1.0, EXAMPLES / 100), f"the run took {elapsed:.0f} s"
