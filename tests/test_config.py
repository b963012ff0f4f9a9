"""One configuration tree: every engine setting is a flag (and a GPTSERVE_ variable), checked at parse time,
grouped in --help, and handed to the engine as the very section the CLI built (pickled once, to the engine-core
process)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from models.loader import experts_kept_packed, load_model
from server.cli import build_parser, checked_sources, parse_config
from server.config import EngineConfig
from server.engine import engine as engine_module
from server.engine.core_startup import start_cores
from server.engine.engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.test_gpt_oss import checkpoint_dir  # noqa: F401

GROUPS = {
    "model": ["--model", "--device", "--dtype", "--keep-experts-packed", "--generation-config"],
    "engine": ["--max-num-seqs", "--kv-cache-tokens", "--kv-memory-fraction", "--enable-prefix-caching"],
    "parallel": ["--tensor-parallel-size", "--tp-step-timeout"],
    "HTTP and security": ["--host", "--port", "--api-key", "--allowed-origins", "--max-body-bytes"],
    "API": ["--chat-template", "--tool-call-parser", "--max-logprobs", "--enable-force-include-usage"],
    "logging": ["--log-level", "--log-requests"],
}


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir, dtype="float32", device="cpu")


def test_help_groups_every_flag_under_its_heading():
    parser = build_parser()
    groups = {group.title: [(a.option_strings or [a.metavar])[0] for a in group._group_actions]
              for group in parser._action_groups}
    for title, flags in GROUPS.items():
        assert set(flags) <= set(groups[title]), title
    assert groups["options"] == ["-h"]  # no flag left ungrouped
    assert groups["positional arguments"] == ["MODEL"]  # vLLM's `vllm serve MODEL`
    text = parser.format_help()
    assert all(f"\n{title}:" in text for title in GROUPS)
    words = " ".join(text.split())
    assert "--no-enable-prefix-caching" in words and "of the device's free memory at start-up" in words


@pytest.mark.parametrize("value", ["0", "1.5", "-0.25", "nan", "half"])
def test_a_kv_memory_fraction_outside_0_to_1_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--kv-memory-fraction", value], {})
    assert exit_info.value.code == 2
    assert "--kv-memory-fraction" in capsys.readouterr().err


def test_a_bad_fraction_in_the_environment_is_refused_and_named(capsys):
    with pytest.raises(SystemExit):
        parse_config([], {"GPTSERVE_KV_MEMORY_FRACTION": "2"})
    assert "GPTSERVE_KV_MEMORY_FRACTION" in capsys.readouterr().err


@pytest.mark.parametrize("argv,environ", [
    (["--no-enable-prefix-caching", "--kv-memory-fraction", "0.5"], {}),
    ([], {"GPTSERVE_ENABLE_PREFIX_CACHING": "0", "GPTSERVE_KV_MEMORY_FRACTION": "0.5"}),
], ids=["flags", "environment"])
def test_engine_settings_reach_the_engine_core_unchanged(argv, environ, tiny_gpt2_dir):
    config = parse_config(["--kv-cache-tokens", "256", "--device", "cpu", "--model", f"tiny={tiny_gpt2_dir}", *argv],
                          environ)
    assert config.engine == EngineConfig(kv_cache_tokens=256, enable_prefix_caching=False, kv_memory_fraction=0.5)
    cores = start_cores(config, checked_sources(config))  # the core process receives the tree as it is
    try:
        ready = cores["tiny"].ready
        assert ready is not None
        assert ready.admission.prefix_caching is False
        assert ready.admission.num_blocks == 256 // config.engine.block_size
    finally:
        for core in cores.values():
            core.kill()


def cached_tokens_on_repeat(loaded, config: EngineConfig) -> int:
    """Prompt tokens the prefix cache serves when a 40-token prompt is sent a second time."""
    engine = LLMEngine(loaded, config)
    prompt = list(range(100, 140))
    cached = []
    for request_id in ("first", "again"):
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_work:
            cached += [out.num_cached_tokens for rid, out in engine.step() if rid == "again" and out.finish_reason]
    return cached[0]


def test_without_prefix_caching_a_repeated_prompt_is_computed_again(loaded):
    assert cached_tokens_on_repeat(loaded, EngineConfig(kv_cache_tokens=256, block_size=8)) == 32
    no_cache = EngineConfig(kv_cache_tokens=256, block_size=8, enable_prefix_caching=False)
    assert cached_tokens_on_repeat(loaded, no_cache) == 0


def test_kv_memory_fraction_sizes_the_pool_when_kv_cache_tokens_is_absent(loaded, monkeypatch):
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 64 * 2**20)
    bytes_per_token = loaded.model.kv_cache_spec().bytes_per_token(loaded.dtype)
    for fraction in (0.25, 0.5):
        config = EngineConfig(kv_memory_fraction=fraction, max_num_seqs=4096, block_size=8)
        engine = LLMEngine(loaded, config)
        assert engine.block_manager.num_blocks == int(64 * 2**20 * fraction) // bytes_per_token // 8
    sized = LLMEngine(loaded, EngineConfig(kv_cache_tokens=256, kv_memory_fraction=0.5, block_size=8))
    assert sized.block_manager.num_blocks == 32  # --kv-cache-tokens wins over the fraction


def test_gpu_memory_utilization_keeps_the_memory_in_use_within_its_share_of_the_total(loaded, monkeypatch):
    """vLLM's flag: 10 of 16 GiB in use (weights and all), 0.75 allowed -> 2 GiB for the KV cache; 0.5 leaves none."""
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 6 * 2**30)
    monkeypatch.setattr(engine_module, "total_memory_bytes", lambda device: 16 * 2**30)
    bytes_per_token = loaded.model.kv_cache_spec().bytes_per_token(loaded.dtype)
    config = EngineConfig(gpu_memory_utilization=0.75, kv_memory_fraction=0.01, max_num_seqs=10**7, block_size=8)
    assert LLMEngine(loaded, config).block_manager.num_blocks == 2 * 2**30 // bytes_per_token // 8
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.5: 10.0 GiB of the device's 16.0 GiB"):
        LLMEngine(loaded, EngineConfig(gpu_memory_utilization=0.5, block_size=8))
    assert parse_config(["--gpu-memory-utilization", "0.9"], {}).engine.gpu_memory_utilization == 0.9


def test_tensor_parallel_ranks_get_the_sections_themselves_and_they_survive_pickling():
    import pickle
    from pathlib import Path

    from server.engine.distributed import shard_spec

    config = parse_config(["--tensor-parallel-size", "2", "--tp-step-timeout", "3", "--kv-cache-dtype", "bfloat16"], {})
    spec = shard_spec(Path("/models/m"), config)
    assert (spec.load, spec.engine, spec.parallel) == (config.load, config.engine, config.parallel)
    assert spec.engine is config.engine
    assert pickle.loads(pickle.dumps(spec)) == spec  # spawned ranks receive it pickled


@pytest.mark.parametrize("argv,environ,expected", [
    ([], {}, None),
    (["--keep-experts-packed"], {}, True),
    (["--no-keep-experts-packed"], {}, False),
    ([], {"GPTSERVE_KEEP_EXPERTS_PACKED": "0"}, False),
    ([], {"GPTSERVE_KEEP_EXPERTS_PACKED": "1"}, True),
])
def test_gpt_oss_experts_are_packed_on_cpu_unless_told(argv, environ, expected, checkpoint_dir):  # noqa: F811
    """By default (None) a CPU load keeps GPT-OSS's experts in MXFP4: dequantized in float32, gpt-oss-20b's would
    need 71 GiB; either flag or its variable decides for every device."""
    load = parse_config(argv, environ).load
    assert load.keep_experts_packed is expected
    model = load_model(checkpoint_dir, **{**asdict(load), "device": "cpu"}).model
    assert model.layers[0].moe.experts.packed is (expected is not False)
    assert experts_kept_packed(load.keep_experts_packed, torch.device("cuda")) is (expected is True)


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    ([], {}, "none"),
    (["--tool-call-parser", "hermes"], {}, "hermes"),
    ([], {"GPTSERVE_TOOL_CALL_PARSER": "hermes"}, "hermes"),
    (["--tool-call-parser", "none"], {"GPTSERVE_TOOL_CALL_PARSER": "hermes"}, "none"),  # the flag turns it off
])
def test_the_tool_call_parser_is_a_flag_and_a_variable(argv, environ, expected):
    assert parse_config(argv, environ).frontend.tool_call_parser == expected


def test_an_unknown_tool_call_parser_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--tool-call-parser", "mistral"], {})
    assert "--tool-call-parser" in capsys.readouterr().err
