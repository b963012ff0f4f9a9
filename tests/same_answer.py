"""Two JSON answers to the same request, compared as clients see them: equal but for the answer's own id and
creation time, and numbers within float32 rounding (the rows may have been batched differently)."""

from __future__ import annotations

import pytest


def assert_same_answer(got: object, expected: object, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected.keys() - {"id", "created"}:
            assert_same_answer(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for index, (mine, theirs) in enumerate(zip(got, expected)):
            assert_same_answer(mine, theirs, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), where
    else:
        assert got == expected, where
