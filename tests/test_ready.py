"""GET /ready: 200 once models are loaded and their engines run, 503 otherwise; open to probes like /health."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.routes import ready
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--model", f"second={tiny_gpt2_dir}",
                        "--api-key", "sesame"]) as running:
        yield running


def route_with(engines: dict[str, bool]) -> TestClient:
    """The /ready route alone, over served models whose engines are healthy or not."""
    app = FastAPI()
    app.include_router(ready.router)
    app.state.models = {name: SimpleNamespace(engine=SimpleNamespace(healthy=ok)) for name, ok in engines.items()}
    return TestClient(app)


def test_ready_once_every_model_is_loaded_and_stepping(server):
    response = httpx.get(server.base_url + "/ready", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "models": {"tiny": True, "second": True}}


def test_ready_and_health_need_no_api_key_while_the_api_does(server):
    assert httpx.get(server.base_url + "/ready", timeout=10).status_code == 200
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(server.v1 + "/models", timeout=10).status_code == 401


def test_ready_answers_with_a_request_id(server):
    response = httpx.get(server.base_url + "/ready", headers={"x-request-id": "probe-1"}, timeout=10)
    assert response.headers["x-request-id"] == "probe-1"


def test_not_ready_when_an_engine_has_failed():
    response = route_with({"tiny": True, "broken": False}).get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "not_ready", "models": {"tiny": True, "broken": False}}


def test_not_ready_without_models():
    response = route_with({}).get("/ready")
    assert response.status_code == 503 and response.json()["status"] == "not_ready"
