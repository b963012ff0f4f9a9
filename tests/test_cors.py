"""--allowed-origins: browsers on those exact origins (or any, with *) may call the API; without the flag no CORS
header at all. vLLM's --allowed-methods, --allowed-headers and --allow-credentials shape the answers.

The app runs in-process with no model: CORS is decided before any route, so none is needed.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import parse_config
from server.config import ServerConfig

ALLOWED = "https://app.example.com"
OTHER = "https://elsewhere.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
# What the OpenAI JS SDK's requests carry besides authorization and content-type (openai-node 4.x/5.x), so what a
# browser asks its preflight to allow
SDK_HEADERS = ("x-stainless-os, x-stainless-lang, x-stainless-package-version, x-stainless-runtime, "
               "x-stainless-runtime-version, x-stainless-arch, x-stainless-retry-count, x-stainless-timeout, "
               "x-stainless-helper-method, openai-organization, openai-project")


def client_for(*flags: str) -> TestClient:
    http = parse_config(["--api-key", "key", *flags], {}).http
    return TestClient(create_app(ServerConfig(http=http), {}))


@pytest.fixture(scope="module")
def browser() -> TestClient:
    return client_for("--allowed-origins", ALLOWED, "--allowed-origins", "http://localhost:3000")


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


@pytest.mark.parametrize("origin", ["app.example.com", ALLOWED + "/", ALLOWED + "/path", '["*", "x"]', '["a'])
def test_allowed_origins_must_be_exact_origins(origin, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--allowed-origins", origin])
    assert "--allowed-origins" in capsys.readouterr().err


def test_the_openai_sdks_headers_and_every_method_of_the_api_pass_a_preflight(browser):
    for method in ("POST", "GET", "DELETE"):  # DELETE: a stored response
        response = browser.options("/v1/responses/resp_1", headers={
            "Origin": ALLOWED, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": f"authorization, content-type, {SDK_HEADERS}"})
        assert response.status_code == 200, (method, response.text)
        allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "x-stainless-timeout", "openai-project"} <= allowed


def test_vllms_json_lists_name_origins_methods_and_headers():
    config = parse_config(["--allowed-origins", f'["{ALLOWED}", "app://obsidian.md"]', "--allowed-methods",
                           '["get", "POST"]', "--allowed-headers", "authorization,content-type"], {}).http
    assert config.allowed_origins == (ALLOWED, "app://obsidian.md")
    assert config.allowed_methods == ("GET", "POST") and config.allowed_headers == ("authorization", "content-type")
    assert parse_config([], {}).http.allowed_methods == ("GET", "POST", "DELETE")  # the flag replaces the default


def test_allowed_methods_and_headers_narrow_what_preflights_get():
    narrow = client_for("--allowed-origins", ALLOWED, "--allowed-methods", "GET,POST", "--allowed-headers",
                        '["authorization", "content-type"]')
    assert narrow.options("/v1/chat/completions", headers={"Origin": ALLOWED, **PREFLIGHT}).status_code == 200
    for asked in ({"Access-Control-Request-Method": "DELETE"},
                  {"Access-Control-Request-Headers": f"authorization, {SDK_HEADERS}"}):
        refused = narrow.options("/v1/responses/resp_1", headers={"Origin": ALLOWED, **PREFLIGHT, **asked})
        assert refused.status_code == 400 and "CORS preflight refused" in refused.json()["error"]["message"]


def test_any_origin_with_star():
    anyone = client_for("--allowed-origins", "*")
    preflight = anyone.options("/v1/chat/completions", headers={"Origin": OTHER, **PREFLIGHT})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    assert anyone.get("/version", headers={"Origin": OTHER}).headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers


def test_allow_credentials_for_named_origins_only(capsys):
    trusted = client_for("--allowed-origins", ALLOWED, "--allow-credentials")
    answer = trusted.get("/version", headers={"Origin": ALLOWED})
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    with pytest.raises(SystemExit):
        parse_config(["--allowed-origins", "*", "--allow-credentials"], {})
    assert "--allow-credentials with --allowed-origins *" in capsys.readouterr().err
