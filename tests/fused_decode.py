"""What the tests of the fused decode kernels (GPT-2's block, GPT-OSS's layer) share: counting the kernel's
calls, and the rule that only decode steps of few rows take it."""

from __future__ import annotations

from types import ModuleType

from models.generation import greedy_generate


def record_calls(monkeypatch, module: ModuleType, name: str, rows_arg: int) -> list[int]:
    """The rows of each call to ``module.name`` (argument ``rows_arg`` is the hidden states), calling through."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(len(args[rows_arg]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def assert_only_small_decode_steps_fuse(model, calls: list[int], max_rows: int, num_layers: int) -> None:
    greedy_generate(model, [[1, 2, 3]] * (max_rows + 1), max_new_tokens=2)  # too many rows: the modules
    assert calls == []
    greedy_generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=3)  # a prefill, then two 2-row decode steps
    assert calls == [2] * 2 * num_layers
    calls.clear()
