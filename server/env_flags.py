"""``GPTSERVE_<FLAG>`` environment variables turned into the command-line arguments they stand for.

Each set variable becomes ``--flag=value`` in front of the real arguments, so argparse checks its type and choices
exactly as it checks the flag's (a default taken from the environment would skip the choices check). A flag
given on the command line wins: its variable is not read at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_name(flag: str) -> str:
    return "GPTSERVE_" + flag.lstrip("-").replace("-", "_").upper()


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every ``--flag`` of the parser but ``--help``."""
    return [action for action in parser._actions  # argparse has no public accessor for its actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)]


def environment_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], given: set[str]
) -> tuple[list[str], list[str]]:
    """The arguments the environment stands for, and the names of the variables read.

    ``given``: dests set on the command line. An empty variable counts as unset (compose files pass
    ``KEY:`` through empty). A repeatable flag (``--model``) or one of several values (``--served-model-name``)
    takes a comma-separated list.
    """
    arguments: list[str] = []
    names: list[str] = []
    for action in flag_actions(parser):
        flag = action.option_strings[0]
        name = env_name(flag)
        value = environ.get(name, "").strip()
        if action.dest in given or not value:
            continue
        names.append(name)
        if action.nargs == 0:  # a switch such as --log-requests or --enable-prefix-caching
            arguments += switch_arguments(parser, action, name, value)
        elif isinstance(action, argparse._AppendAction):
            arguments += [f"{flag}={item.strip()}" for item in value.split(",") if item.strip()]
        elif action.nargs == "+":  # --served-model-name a b
            arguments += [flag, *(item.strip() for item in value.split(",") if item.strip())]
        else:
            arguments.append(f"{flag}={value}")  # one token: a value starting with "-" stays a value
    return arguments, names


def switch_arguments(parser: argparse.ArgumentParser, action: argparse.Action, name: str, value: str) -> list[str]:
    """A false word turns off a switch that is on by default through its ``--no-`` form."""
    if value.lower() in TRUE_WORDS:
        return [action.option_strings[0]]
    if value.lower() in FALSE_WORDS:
        return list(action.option_strings[1:2]) if isinstance(action, argparse.BooleanOptionalAction) else []
    parser.error(f"{name}={value!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
