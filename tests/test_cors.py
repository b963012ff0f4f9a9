"""--allowed-origins: browsers on those exact origins may call the API; without the flag no CORS header at all.

The app runs in-process with no model: CORS is decided before any route, so none is needed.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import parse_config
from server.config import HTTPConfig, ServerConfig

ALLOWED = "https://app.example.com"
OTHER = "https://elsewhere.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


def client_for(**http) -> TestClient:
    return TestClient(create_app(ServerConfig(http=HTTPConfig(api_key="key", **http)), {}))


@pytest.fixture(scope="module")
def browser() -> TestClient:
    return client_for(allowed_origins=(ALLOWED, "http://localhost:3000"))


def cors_headers(response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-")}


def test_without_allowed_origins_no_response_carries_cors_headers():
    plain = client_for()
    preflight = plain.options("/v1/chat/completions", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert cors_headers(preflight) == {}
    assert cors_headers(plain.get("/version", headers={"Origin": ALLOWED})) == {}


def test_preflight_from_an_allowed_origin_allows_the_methods_and_auth_headers(browser):
    response = browser.options("/v1/chat/completions", headers={"Origin": ALLOWED, **PREFLIGHT})
    assert response.status_code == 200  # answered before the API key check: a preflight carries no key
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert {"GET", "POST"} <= {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    allowed_headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers


def test_preflight_from_another_origin_is_refused_with_the_error_shape(browser):
    for origin in (OTHER, ALLOWED + ":8443", "http://app.example.com"):  # exact: scheme, host and port
        response = browser.options("/tokenize", headers={"Origin": origin, **PREFLIGHT})
        assert response.status_code == 400
        assert "access-control-allow-origin" not in response.headers
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_answers_to_an_allowed_origin_carry_it_even_when_the_key_is_missing(browser):
    refused = browser.get("/v1/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401  # the browser can read why
    assert refused.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in refused.headers["access-control-expose-headers"]
    served = browser.get("/v1/models", headers={"Origin": "http://localhost:3000", "Authorization": "Bearer key"})
    assert served.status_code == 200
    assert served.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in browser.get("/version", headers={"Origin": OTHER}).headers


def test_allowed_origins_flag_repeats_and_the_environment_takes_a_comma_list(monkeypatch):
    assert parse_config([]).http.allowed_origins == ()
    flags = ["--allowed-origins", ALLOWED, "--allowed-origins", "http://localhost:3000"]
    assert parse_config(flags).http.allowed_origins == (ALLOWED, "http://localhost:3000")
    monkeypatch.setenv("GPTSERVE_ALLOWED_ORIGINS", f"{ALLOWED}, {OTHER}")
    assert parse_config([]).http.allowed_origins == (ALLOWED, OTHER)
    assert parse_config(["--allowed-origins", OTHER]).http.allowed_origins == (OTHER,)  # the flag wins


@pytest.mark.parametrize("origin", ["*", "app.example.com", ALLOWED + "/", ALLOWED + "/path"])
def test_allowed_origins_must_be_exact_origins(origin, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--allowed-origins", origin])
    assert "not an exact origin" in capsys.readouterr().err
