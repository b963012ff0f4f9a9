"""Every flag can be set as ``GPTSERVE_<FLAG>`` with the same effect as the flag, checked as strictly, and a flag
on the command line wins over its variable."""

from __future__ import annotations

import argparse

import httpx
import pytest

from server.cli import build_parser, parse_config
from server.env_flags import env_name, flag_actions
from tests.server_process import ServerProcess

CANDIDATE_VALUES = ["7", "8", "0.5", "bfloat16", "some-text", "2", "0.9",  # tried in turn until the flag accepts one
                    '{"temperature": 0.5}', "/llm", "/health,/metrics"]
# vLLM's flags for what is the default here: each must win over the variable that asks for the opposite
DEFAULT_SPELLINGS = {"--disable-log-requests": "GPTSERVE_LOG_REQUESTS"}
CANDIDATE_PAIRS = [("a=/models/a", "b=/models/b"), ("https://a.example", "http://b.example:8080"),  # repeatables
                   ("PUT", "PATCH"), ("pkg.first", "pkg.second")]


def flags() -> list[argparse.Action]:
    return flag_actions(build_parser())


def accepts(flag: str, value: str) -> bool:
    try:
        parse_config([flag, value], {})
    except SystemExit:
        return False
    return True


def sample_arguments(action: argparse.Action) -> tuple[list[str], str]:
    """Arguments setting ``action`` to something other than its default, and the same as a variable's value."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch: its form that is not the default, and the word that means it
        return ([action.option_strings[1]], "0") if action.default is True else ([flag], "1")
    if isinstance(action, argparse._AppendAction):
        first, second = next(pair for pair in CANDIDATE_PAIRS if accepts(flag, pair[0]))
        return [flag, first, flag, second], f"{first},{second}"
    default = parse_config([], {})
    candidates = [c for c in action.choices if c != action.default] if action.choices else CANDIDATE_VALUES
    for value in candidates:
        if accepts(flag, value) and parse_config([flag, value], {}) != default:
            return [flag, value], value
    raise AssertionError(f"no sample value for {flag}: add one to CANDIDATE_VALUES")


def other_value(action: argparse.Action, value: str) -> str:
    """A second value the flag accepts: its default spelled out, else another candidate."""
    flag = action.option_strings[0]
    options = ([] if action.default is None else [str(action.default)]) + list(action.choices or CANDIDATE_VALUES)
    return next(option for option in options if option != value and accepts(flag, option))


@pytest.mark.parametrize("action", flags(), ids=lambda action: action.option_strings[0])
def test_the_variable_has_the_flags_effect(action):
    flag = action.option_strings[0]
    if flag in DEFAULT_SPELLINGS:
        opposite = {DEFAULT_SPELLINGS[flag]: "1"}
        assert parse_config([], opposite) != parse_config([], {})
        assert parse_config([flag], opposite) == parse_config([], {env_name(flag): "1", **opposite}) == \
            parse_config([], {})
        return
    argv, value = sample_arguments(action)
    from_flag = parse_config(argv, {})
    assert from_flag != parse_config([], {})
    assert parse_config([], {env_name(action.option_strings[0]): value}) == from_flag


@pytest.mark.parametrize("action", flags(), ids=lambda action: action.option_strings[0])
def test_the_flag_wins_over_its_variable(action):
    argv, value = sample_arguments(action)
    variable = env_name(action.option_strings[0])
    if action.nargs == 0:  # the variable says the opposite of the flag
        opposite = "1" if value == "0" else "0"
        if action.default is not None:  # an on/off switch, whose opposite is its default (None: on, off or auto)
            assert parse_config([], {variable: opposite}) == parse_config([], {})
        assert parse_config(argv, {variable: opposite}) == parse_config(argv, {})
        return
    if isinstance(action, argparse._AppendAction):
        assert parse_config(argv, {variable: "c=/models/c"}) == parse_config(argv, {})
        return
    flag_value = other_value(action, value)
    from_flag = parse_config([argv[0], flag_value], {})
    assert from_flag != parse_config([], {variable: value})
    assert parse_config([argv[0], flag_value], {variable: value}) == from_flag


@pytest.mark.parametrize("action", flags(), ids=lambda action: action.option_strings[0])
def test_help_names_the_variable(action):
    assert f"[env {env_name(action.option_strings[0])}]" in action.help


@pytest.mark.parametrize("variable,value", [("GPTSERVE_DEVICE", "gpu"), ("GPTSERVE_PORT", "eighty"),
                                            ("GPTSERVE_MAX_NUM_SEQS", "0"), ("GPTSERVE_LOG_REQUESTS", "maybe")])
def test_a_bad_value_in_the_environment_is_refused_and_named(variable, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config([], {variable: value})
    assert exit_info.value.code == 2
    assert variable in capsys.readouterr().err


def test_empty_variables_count_as_unset():
    """docker compose passes ``KEY:`` through as an empty value when the host leaves it unset."""
    assert parse_config([], {"GPTSERVE_PORT": "", "GPTSERVE_MODEL": "", "GPTSERVE_LOG_REQUESTS": ""}) == \
        parse_config([], {})


def test_vllms_api_key_variable_is_read_when_no_key_is_given():
    """A deployment moved from vLLM with VLLM_API_KEY set must not start open to everyone."""
    assert parse_config([], {"VLLM_API_KEY": "from-vllm"}).http.api_keys == ("from-vllm",)
    assert parse_config([], {"VLLM_API_KEY": "from-vllm", "GPTSERVE_API_KEY": "ours"}).http.api_keys == ("ours",)
    assert parse_config(["--api-key", "flag"], {"VLLM_API_KEY": "from-vllm"}).http.api_keys == ("flag",)
    assert parse_config([], {"VLLM_API_KEY": " "}).http.api_keys == ()


def test_a_value_that_starts_with_a_dash_stays_a_value():
    assert parse_config([], {"GPTSERVE_API_KEY": "--port"}).http.api_keys == ("--port",)


@pytest.fixture(scope="module")
def server_from_environment(tiny_gpt2_dir):
    env = {"GPTSERVE_MODEL": f"tiny={tiny_gpt2_dir},again={tiny_gpt2_dir}", "GPTSERVE_API_KEY": "sesame",
           "GPTSERVE_MAX_MODEL_LEN": "32"}
    with ServerProcess([], env=env) as running:
        yield running


def test_a_server_configured_only_by_the_environment_applies_it(server_from_environment):
    v1, key = server_from_environment.v1, {"Authorization": "Bearer sesame"}
    assert httpx.get(v1 + "/models", timeout=10).status_code == 401
    models = httpx.get(v1 + "/models", headers=key, timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny", "again"]
    too_long = {"model": "again", "prompt": "Hello", "max_tokens": 40}
    response = httpx.post(v1 + "/completions", json=too_long, headers=key, timeout=10)
    assert response.status_code == 400 and "32" in response.json()["error"]["message"]
