"""Schemathesis against the API's own OpenAPI document: valid and invalid requests for every operation,
and not one may get a 5xx (or raise inside the server).

The API runs in-process (ASGI) on a tiny random-weight SD 1.x model. Generation requests that are valid
keep their field types and meaning, but their amount of work is clamped (at most 2 steps, 2 images,
64x64 unless the case asks for an invalid size) so that the run takes minutes, not a day."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402

EXAMPLES = int(os.environ.get("EASEL_FUZZ_EXAMPLES", "25"))  # per operation and mode; raise it for a long run
GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/easel/v1/jobs/txt2img", "/easel/v1/jobs/img2img")
CLAMP = {"steps": 2, "n_iter": 2, "batch_size": 2, "hr_second_pass_steps": 2}
SIZES = ("width", "height", "hr_resize_x", "hr_resize_y")


def clamp(body: dict) -> dict:
    """Less work, same validity: a value the API would accept stays acceptable."""
    body = {"steps": 2, "width": 64, "height": 64, **body}  # A1111's API defaults are 50 steps at 512x512
    for key, most in CLAMP.items():
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and most < body[key] <= 1000:
            body[key] = most
    for key in SIZES:
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and 64 < body[key] <= 4096 \
                and body[key] % 8 == 0:
            body[key] = 64
    if isinstance(body.get("hr_scale"), (int, float)) and not isinstance(body["hr_scale"], bool) \
            and 1.5 < body["hr_scale"] <= 8:
        body["hr_scale"] = 1.5
    return body


@pytest.fixture
def fuzz_app(sd1_manager, tmp_path):
    from fastapi import FastAPI

    from api import ApiContext, mount
    from backend.extensions import NO_EXTENSIONS
    from backend.options import Options
    from backend.runtime import Runtime
    from backend.styles import StyleDatabase

    sd1_manager.select()
    runtime = Runtime(sd1_manager.settings, Options(save_images=False), tmp_path / "config.json", sd1_manager,
                      NO_EXTENSIONS, StyleDatabase(tmp_path / "styles.csv"))
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, ApiContext(runtime))
    yield app
    runtime.shutdown()


def test_no_request_the_schema_allows_or_forbids_gets_a_server_error(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def call(case):
                if operation.path in GENERATION and isinstance(case.body, dict):
                    case.body = clamp(case.body)
                response = case.call()
                assert response.status_code < 500, (operation.path, case.body, case.query, response.text[:300])

            try:
                call()
            except hypothesis.errors.Unsatisfiable:  # nothing invalid to send (an operation without inputs)
                assert mode == schemathesis.GenerationMode.NEGATIVE
