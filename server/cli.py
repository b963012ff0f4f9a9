"""``gptserve`` / ``python -m server``: flags (each also read from ``GPTSERVE_<FLAG>``), model loading, uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING, NoReturn

from server import flag_types
from server.config import DEFAULT_MAX_BODY_BYTES, SECTIONS, ServerConfig
from server.env_flags import env_name, environment_arguments
from server.tls import TLSSettingsError, cert_reqs, check_tls
from server.user_middleware import check_user_middleware

if TYPE_CHECKING:
    from fastapi import FastAPI

    from models.loader import LoadedModel
    from server.model_source import ModelSource

log = logging.getLogger("gptserve")

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
CORS_METHODS = ["GET", "POST", "DELETE"]  # every method the API serves


class _Parser(argparse.ArgumentParser):
    """Names the GPTSERVE_* variables that became arguments when it refuses one, so a bad value set in the
    environment is not blamed on a flag nobody typed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.environment: list[str] = []

    def error(self, message: str) -> NoReturn:
        if self.environment:
            message += f" (arguments also read from the environment: {', '.join(self.environment)})"
        super().error(message)


def build_parser(*, defaults: bool = True) -> _Parser:
    """Every flag, in --help groups. ``defaults=False`` makes a probe without defaults or --help, whose namespace
    holds only the flags actually given: those the environment must not override. Each flag's dest is the name
    of its field in one section of ServerConfig (see parse_config)."""
    parser = _Parser(
        prog="gptserve",
        description="OpenAI-compatible server for GPT-2 and GPT-OSS checkpoints. Every flag can also be set "
        "in the environment as GPTSERVE_<FLAG>, e.g. GPTSERVE_MAX_NUM_SEQS=32 or GPTSERVE_LOG_REQUESTS=1; "
        "flags win over the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=defaults,
    )
    parser.add_argument("model_tag", nargs="?", default=None if defaults else argparse.SUPPRESS, metavar="MODEL",
                        help="the model to serve, as `vllm serve MODEL` takes it: the same as --model MODEL (put it "
                        "before the flags)")
    group = parser.add_argument_group("model", "what is served and how its weights are loaded")

    def add(flag: str, help: str, *aliases: str, **kwargs) -> None:
        if not defaults:
            kwargs["default"] = argparse.SUPPRESS
        group.add_argument(flag, *aliases, help=f"{help} [env {env_name(flag)}]", **kwargs)

    add("--model", "checkpoint to serve, repeatable: PATH, NAME=PATH or a HuggingFace hub id "
        "(env: comma-separated). Default: gpt2 from the HF cache/hub, else a tiny random-weight demo model",
        action="append", default=None)
    add("--served-model-name", "vLLM's flag: the name clients give the one model served, in place of the one "
        "--model gives it; further names are aliases a request may use, while answers and metrics carry the first "
        "(env: comma-separated)", nargs="+", default=None, metavar="NAME")
    add("--device", "where the model runs", choices=["auto", "cpu", "cuda"], default="auto")
    add("--dtype", "weight and activation dtype. auto: bfloat16 on GPU; on CPU bfloat16 where the CPU has "
        "AMX-BF16 or AVX512-BF16, else float32 (exact to the checkpoint). bfloat16 on CPU: bf16 matmuls with fp32 "
        "sums where the CPU has AMX-BF16 or AVX512-BF16 (torch's emulated ones elsewhere, slow), fp32 logits",
        choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    add("--cpu-weight-dtype", "with --device cpu and --dtype float32: bfloat16 rounds the weights to bf16 and "
        "streams them at half the bytes in decode steps (activations and sums stay float32; outputs move by the "
        "rounding); float32 keeps the checkpoint's values", choices=["float32", "bfloat16"], default="float32")
    add("--keep-experts-packed", "keep GPT-OSS MoE experts in MXFP4 (4.25 bits a value: gpt-oss-20b's experts 9.5 "
        "GiB instead of 36 in bf16 or 71 in float32), read by C++ kernels on CPU and dequantized per step on GPU; "
        "--no-keep-experts-packed (env: 0) dequantizes them once at load. Default (None): packed on CPU only",
        action=argparse.BooleanOptionalAction, default=None)
    add("--generation-config", "vLLM's flag: where each model's generation_config.json is read. auto: the model's "
        "folder; its eos_token_id ends choices beside the tokenizer's end of text, and its temperature, top_p, top_k, "
        "min_p and repetition_penalty are the defaults of requests that leave them unset, its max_new_tokens a limit "
        "on every choice's output tokens. vllm: the end tokens only. A folder: its generation_config.json instead",
        default="auto", metavar="auto|vllm|DIR")
    add("--override-generation-config", "vLLM's flag: sampling defaults as a JSON object, set over the generation "
        "config's, e.g. '{\"temperature\": 0.6, \"max_new_tokens\": 512}'", type=flag_types.generation_overrides,
        default={}, metavar="JSON")
    add("--tokenizer", "vLLM's flag: the tokenizer's folder, or a hub id whose tokenizer files are fetched, in place "
        "of the model's own (for a checkpoint shipped without one); one model only", default=None,
        metavar="PATH|HUB_ID")
    add("--revision", "vLLM's flag: the branch, tag or commit of every model given as a hub id (default: main); "
        "with HF_HUB_OFFLINE set, one already in the cache", type=flag_types.non_empty, default=None,
        metavar="REVISION")
    add("--tokenizer-revision", "vLLM's flag: the branch, tag or commit of --tokenizer's hub id (default: "
        "--revision's)", type=flag_types.non_empty, default=None, metavar="REVISION")
    add("--download-dir", "vLLM's flag: the HuggingFace hub cache that hub models and tokenizers are read from and "
        "downloaded into (default: huggingface_hub's, HF_HUB_CACHE or ~/.cache/huggingface/hub)",
        type=flag_types.non_empty, default=None, metavar="DIR")
    add("--hf-token", "vLLM's flag: the token that hub downloads send (a gated or private model); bare: the one "
        "`hf auth login` saved. Default: HF_TOKEN, else the saved one", type=flag_types.non_empty, nargs="?",
        const=True, default=None, metavar="TOKEN")
    add("--seed", "seed for the global RNGs (per-request seeds come from the request)", type=int, default=None)

    group = parser.add_argument_group("engine", "scheduling and the KV cache")
    add("--max-num-seqs", "most sequences decoded together in one step", type=flag_types.positive_int, default=64)
    add("--max-num-batched-tokens", "most tokens (prefill + decode) in one step", type=flag_types.positive_int,
        default=512)
    add("--max-model-len", "longest prompt + completion in tokens (default: the model's context length)",
        type=flag_types.positive_int, default=None)
    add("--max-queue", "sequences (n per prompt) allowed to wait before new requests get 429",
        type=flag_types.positive_int, default=1024)
    add("--kv-cache-tokens", "KV cache capacity in tokens (default: sized by --kv-memory-fraction)",
        type=flag_types.positive_int, default=None)
    add("--kv-memory-fraction", "fraction in (0, 1] of the device's free memory at start-up given to the KV cache, "
        "when --kv-cache-tokens is not given (never more than --max-num-seqs x --max-model-len tokens)",
        type=flag_types.fraction, default=0.25)
    add("--gpu-memory-utilization", "vLLM's flag, in place of --kv-memory-fraction: the KV cache takes what keeps the "
        "device's memory in use (weights and other processes included) within this fraction in (0, 1] of its "
        "total, GPU memory or the host's RAM", type=flag_types.fraction, default=None)
    add("--block-size", "tokens per KV cache block", type=flag_types.positive_int, default=16)
    add("--kv-cache-dtype", "dtype of the KV cache (auto: the model's). bfloat16 under a float32 model holds "
        "twice the tokens and halves what decode attention reads; keys and values are rounded to bf16 when "
        "stored, so outputs move by that rounding", choices=["auto", "float32", "bfloat16"], default="auto")
    add("--enable-prefix-caching", "reuse the KV blocks of prompt prefixes already computed; "
        "--no-enable-prefix-caching (env: 0) recomputes every prompt", action=argparse.BooleanOptionalAction,
        default=True)
    add("--scheduling-policy", "fcfs: requests are served in arrival order; priority: by their `priority` field "
        "(lower first, then arrival), and a sequence preempted for KV blocks is the least urgent one",
        choices=["fcfs", "priority"], default="fcfs")
    add("--enforce-eager", "on CUDA, launch every decode step's kernels one by one instead of replaying "
        "CUDA graphs captured at start-up (for debugging; slower)", action="store_true")

    group = parser.add_argument_group("parallel", "tensor parallelism (docs/distributed.md)")
    add("--tensor-parallel-size", "ranks (one GPU each) to shard the model over; this process is rank 0 and "
        "spawns the others, or joins torchrun's (see docs/distributed.md)", type=flag_types.positive_int, default=1)
    add("--tp-step-timeout", "with --tensor-parallel-size > 1: seconds a rank may lag inside one step's "
        "collectives before the step fails, the engine turns unhealthy and requests get 503",
        type=flag_types.positive_float, default=8.0)

    group = parser.add_argument_group("HTTP and security", "the listener, its limits, and who may call it")
    add("--host", "address to listen on", default="127.0.0.1")
    add("--port", "port to listen on", type=int, default=8000)
    add("--uds", "vLLM's flag: listen on this Unix domain socket (created at start, removed at exit) instead of "
        "--host and --port, for a proxy or sidecar on the same machine", default=None, metavar="PATH")
    add("--api-key", "require 'Authorization: Bearer KEY' on /v1/* routes; several keys (vLLM's list, e.g. while "
        "rotating one): any of them (env: comma-separated). Unset, vLLM's VLLM_API_KEY is read", nargs="+",
        action="extend", type=flag_types.api_key, dest="api_keys", default=None, metavar="KEY")
    add("--metrics-require-key", "with --api-key, /metrics demands the key too (by default scrapers need none)",
        action="store_true")
    add("--allowed-origins", "browser origin allowed to call the API (CORS), exact: https://app.example.com[:port], "
        "or * for any; repeatable, comma-separated, or vLLM's JSON list '[\"https://a.example\"]'. Default none: no "
        "CORS headers at all, whatever the three flags below say", action="extend", type=flag_types.origins, default=[],
        metavar="ORIGIN")
    add("--allowed-methods", "vLLM's flag: methods allowed in a CORS preflight, as --allowed-origins takes a list "
        f"(* for any); default: the API's, {', '.join(CORS_METHODS)}", action="extend", type=flag_types.methods,
        default=None, metavar="METHOD")
    add("--allowed-headers", "vLLM's flag: request headers allowed in a CORS preflight, as --allowed-origins takes a "
        "list; default * (any the browser asks for, Authorization included: the OpenAI SDK's x-stainless-* among "
        "them)", action="extend", type=flag_types.headers, default=None, metavar="HEADER")
    add("--allow-credentials", "vLLM's flag: browsers may send cookies and HTTP authentication to the allowed "
        "origins (Access-Control-Allow-Credentials); not with --allowed-origins *", action="store_true")
    add("--max-body-bytes", "largest request body accepted; larger ones get 413", type=flag_types.positive_int,
        default=DEFAULT_MAX_BODY_BYTES)
    add("--keep-alive-timeout", "seconds an idle keep-alive connection stays open", type=flag_types.positive_float,
        default=5.0)
    add("--header-timeout", "seconds a request's headers may take to arrive before the connection is closed",
        type=flag_types.positive_float, default=10.0)
    add("--body-timeout", "seconds a request's body may take to arrive (after its headers) before a 408",
        type=flag_types.positive_float, default=30.0)
    add("--max-connections", "open connections served at once; requests over this get 503",
        type=flag_types.positive_int, default=1024)
    add("--drain-timeout", "on SIGTERM, seconds in-flight requests get to finish before they are ended with a 503 "
        "(an error event then [DONE] on a stream)", type=flag_types.positive_float, default=30.0)
    add("--root-path", "the path prefix a proxy serves the API under, e.g. /llm (vLLM's flag): requests may come "
        "with it or with it stripped, and /docs and the OpenAPI document name it", type=flag_types.root_path,
        default="")
    add("--middleware", "vLLM's flag, repeatable: the import path of an ASGI middleware class or of an async function "
        "(request, call_next) to run on every request once the gateway has let it in (API key, body limits); "
        "a later one wraps the earlier ones (env: comma-separated)", action="append", type=flag_types.import_path,
        default=None, metavar="MODULE.NAME")
    add("--enable-server-load-tracking", "vLLM's flag: GET /load answers {\"server_load\": N}, the requests in "
        "flight that run a model, for load balancers (open like /health)", action="store_true")
    add("--disable-fastapi-docs", "vLLM's flag: no /docs, /redoc or /openapi.json", action="store_true")
    add("--ssl-certfile", "serve HTTPS with this PEM certificate (chain): vLLM's flag, as are the three below",
        default=None, metavar="PATH")
    add("--ssl-keyfile", "the certificate's PEM private key, unencrypted; None: the key is in --ssl-certfile",
        default=None, metavar="PATH")
    add("--ssl-ca-certs", "PEM CA certificates that client certificates are checked against (with --ssl-cert-reqs)",
        default=None, metavar="PATH")
    add("--ssl-cert-reqs", "client certificates: 0 or none (not asked for), 1 or optional (checked when given), "
        "2 or required (mutual TLS: a client without a valid one cannot connect)", type=cert_reqs, default=0,
        metavar="0|1|2")
    add("--ssl-ciphers", "vLLM's flag: OpenSSL's cipher list for TLS 1.2 and below, e.g. "
        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305 (TLS 1.3's suites are OpenSSL's own)", default=None,
        metavar="CIPHERS")
    add("--enable-ssl-refresh", "vLLM's flag: reload the certificate, key and CAs when their files change (a "
        "renewal, e.g. cert-manager's), for new connections, without a restart; a half-written set is retried",
        action="store_true")

    group = parser.add_argument_group("API", "what requests may ask for and how answers are shaped")
    add("--chat-template", "Jinja chat template (file path or the text) for models without a built-in chat "
        "format (GPT-2)", default=None)
    add("--tool-call-parser", "how a chat-template model's own tool calls are read from its text when a request "
        "offers tools (vLLM's flag): hermes reads <tool_call>{\"name\", \"arguments\"}</tool_call>; none: all "
        "text is content. GPT-OSS's calls are harmony's whatever this says; openai (vLLM's name for them) is "
        "refused with a chat-template model", choices=["none", "hermes", "openai"], default="none")
    add("--reasoning-parser", "vLLM's flag: openai_gptoss names GPT-OSS's harmony reasoning (the analysis channel), "
        "which GPT-OSS models read into reasoning whether or not it is given; refused with a chat-template model",
        choices=["none", "openai_gptoss"], default="none")
    add("--enable-auto-tool-choice", "vLLM's switch for tool_choice auto (the default when a request offers tools): "
        "the model may answer or call a tool. On here unless --no-enable-auto-tool-choice (env: 0), which refuses "
        "such requests with a 400 as vLLM does without the flag; none, required and named choices stay",
        action=argparse.BooleanOptionalAction, default=True)
    add("--trust-request-chat-template", "let requests bring their own chat template (vLLM's chat_template field): "
        "only for trusted clients, since a template is code that runs on the server (sandboxed, in a worker "
        "thread, stopped past 5 s; a single long C-level operation is not)", action="store_true")
    add("--max-logprobs", "vLLM's flag: the most alternatives a token a request may ask for (completions' logprobs, "
        "chat's and Responses' top_logprobs, prompt_logprobs); -1: the whole vocabulary. A response holds up to that "
        "many entries for every token it returns", type=flag_types.max_logprobs, default=20)
    add("--enable-force-include-usage", "vLLM's flag: every completions and chat stream ends with a usage chunk, "
        "whether or not its stream_options ask for one", action="store_true")
    add("--default-chat-template-kwargs", "vLLM's flag: chat template variables as a JSON object, under each "
        "request's chat_template_kwargs (the request's win), e.g. '{\"enable_thinking\": false}'; for GPT-OSS only "
        "harmony's, '{\"reasoning_effort\": \"high\"}' or current_date. Chat, Responses, /tokenize and embeddings "
        "render with them", type=flag_types.template_kwargs, default={}, metavar="JSON")
    add("--response-role", "vLLM's flag: the role chat completions give their messages when the request adds a "
        "generation prompt (add_generation_prompt, the default); without one it is the last message's role",
        type=flag_types.non_empty, default="assistant", metavar="ROLE")
    add("--return-tokens-as-token-ids", "vLLM's flag: logprobs name each token \"token_id:N\" (exact where its "
        "bytes are not whole UTF-8) unless a request's return_tokens_as_token_ids says false", action="store_true")

    group = parser.add_argument_group("logging")
    add("--log-level", "log verbosity", choices=LOG_LEVELS, type=str.lower, default="info")
    add("--log-requests", "include request bodies (prompts) in the request log; --enable-log-requests is vLLM's "
        "name for it", "--enable-log-requests", action="store_true")
    add("--disable-log-requests", "vLLM's older flag, and the default here: bodies stay out of the request log, "
        "whatever GPTSERVE_LOG_REQUESTS says", action="store_false", dest="log_requests", default=False)
    add("--enable-log-outputs", "vLLM's flag: the request log line also holds each choice's output (text, or chat's "
        "content, reasoning and tool calls; its token ids; finish_reason), cut at --max-log-len; here it does not need "
        "--log-requests. Completions, chat and Responses (not background ones)", action="store_true",
        dest="log_outputs")
    add("--max-log-len", "bytes of a request body the request log keeps, characters (or token ids) of each logged "
        "output (vLLM's flag; with --log-requests or --enable-log-outputs)",
        type=flag_types.positive_int, default=4096)
    add("--disable-access-log", "no log line per request (method, route, status, latency, tokens); "
        "--disable-uvicorn-access-log is vLLM's name for it", "--disable-uvicorn-access-log", action="store_true")
    add("--disable-access-log-for-endpoints", "vLLM's flag: paths whose requests get no log line, comma-separated, "
        "e.g. /health,/metrics,/ping (probes and scrapes)", type=flag_types.url_paths, default=(), metavar="PATHS")
    add("--uvicorn-log-level", "vLLM's flag: the level of uvicorn's own log lines (start, stop, protocol errors); "
        "default: --log-level's", choices=[*LOG_LEVELS, "trace"], type=str.lower, default=None)
    add("--disable-log-stats", "vLLM's flag: no log line per model every --log-stats-interval seconds while it works "
        "(prompt and generation throughput, requests running and waiting, KV cache use, prefix cache hits)",
        action="store_true")
    add("--log-stats-interval", "seconds between those lines", type=flag_types.positive_float, default=10.0)
    return parser


def parse_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The flags in ``argv`` (default: sys.argv), each flag not given read from ``environ`` (default: os.environ)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    given, _ = build_parser(defaults=False).parse_known_args(argv)
    parser = build_parser()
    from_environment, parser.environment = environment_arguments(parser, environ, set(vars(given)))
    values = vars(parser.parse_args(from_environment + argv))
    if not values["api_keys"]:  # vLLM's variable: a deployment moved from vLLM keeps its key, never loses it
        values["api_keys"] = [key for key in [environ.get("VLLM_API_KEY", "").strip()] if key]
    values["api_keys"] = tuple(values["api_keys"])
    values["allowed_origins"] = tuple(values["allowed_origins"])
    values["middleware"] = tuple(values["middleware"] or ())
    values["allowed_methods"] = tuple(values["allowed_methods"] or CORS_METHODS)  # extend would add to a default
    values["allowed_headers"] = tuple(values["allowed_headers"] or ["*"])
    if values["allow_credentials"] and "*" in values["allowed_origins"]:
        parser.error("--allow-credentials with --allowed-origins * would let every site act with its visitors' "
                     "credentials: name the origins")
    sections = {name: section(**{f.name: values.pop(f.name) for f in fields(section)})
                for name, section in SECTIONS.items()}
    tag = values.pop("model_tag")
    return ServerConfig(models=(*([tag] if tag else []), *(values.pop("model") or ())),
                        served_model_names=tuple(values.pop("served_model_name") or ()), **sections, **values)


def main(argv: list[str] | None = None) -> int:
    """``gptserve``: load the models, then serve HTTP until SIGTERM/SIGINT."""
    return start_and_run(argv, _serve)


def _serve(app: FastAPI, config: ServerConfig) -> int:
    from server.app import abort_in_flight
    from server.http_server import serve

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _drained)
    serve(app, config, cut=lambda: abort_in_flight(app))
    return app.state.exit_status  # 1 when an engine core failed


def start_and_run(argv: list[str] | None, run: Callable[[FastAPI, ServerConfig], int]) -> int:
    """Parse the flags, start every model's engine core, build the app and hand it to ``run`` (serving HTTP, or
    server.run_batch's file of requests); the cores end with it. Exit status 2 when the models cannot load."""
    from server.engine.host_memory import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # before any thread exists: every later thread then shares the tuned heap
    # OpenMP workers spin a short while (libgomp's count, ~1 ms here) after each parallel region before they
    # sleep: a step's ~75 regions then run back to back, and an idle core sleeps within a millisecond. Only the
    # engine cores load OpenMP (the front end never imports torch) and inherit this: served GPT-2-124M with bf16
    # weights, 2 cores, C=1 57-59 out tok/s sleeping at once (PASSIVE) against 77-80 (bench/NOTES.md).
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    config = parse_config(argv)

    from server.logging_setup import configure_logging

    configure_logging(config.log_level)
    try:
        config = with_resolved_tokenizer(config)
        if config.parallel.tensor_parallel_size > 1 and int(os.environ.get("RANK", "0")) > 0:  # a torchrun worker rank
            from server.engine.distributed import run_torchrun_rank

            return run_torchrun_rank(model_sources(config)[0].directory, config)
        check_tls(config.http)
        check_user_middleware(config.http.middleware)  # before the models load: a typo costs no minutes
        from server.engine.core_startup import spawn_cores, wait_for_cores

        cores = spawn_cores(config, checked_sources(config))  # each model's weights load in its own core process
    except TLSSettingsError as e:
        return _cannot_start(e, "cannot serve HTTPS")
    except (OSError, ValueError) as e:  # ModelSourceError, a bad combination of flags
        return _cannot_start(e)
    try:  # the app's imports run while the cores load
        from server.app import create_app

        try:
            wait_for_cores(cores, config)
            families = {name: core.family for name, core in cores.items()}
            _check_harmony_parsers(config, families)
            _check_default_template_kwargs(config, families)
        except (OSError, ValueError) as e:  # CheckpointError, TokenizerError, missing files, as a core saw them
            return _cannot_start(e)
        return run(create_app(config, cores), config)
    finally:  # the app failed to start, or never did: no core may outlive us
        for core in cores.values():
            core.kill()


def _check_harmony_parsers(config: ServerConfig, families: dict[str, str]) -> None:
    """``--tool-call-parser openai`` and ``--reasoning-parser openai_gptoss`` name harmony's calls and reasoning,
    which only GPT-OSS writes."""
    templated = sorted(name for name, family in families.items() if family != "gpt_oss")
    if config.frontend.tool_call_parser == "openai" and templated:
        raise ValueError(f"--tool-call-parser openai reads GPT-OSS's harmony tool calls, and {templated} use a chat "
                         "template: give hermes or none (GPT-OSS models read harmony's calls whatever it says)")
    if config.frontend.reasoning_parser == "openai_gptoss" and templated:
        raise ValueError(f"--reasoning-parser openai_gptoss reads GPT-OSS's harmony reasoning, and {templated} use a "
                         "chat template, whose text is all content: leave it out")


def _check_default_template_kwargs(config: ServerConfig, families: dict[str, str]) -> None:
    """Defaults a GPT-OSS model cannot render would turn every chat request into a 400: refused at the start."""
    from server.routes.chat_prompt import harmony_variables_problem

    rest = dict(config.frontend.default_chat_template_kwargs)
    effort, current_date = rest.pop("reasoning_effort", None), rest.pop("current_date", None)
    problem = harmony_variables_problem(rest, effort, current_date)
    harmony = sorted(name for name, family in families.items() if family == "gpt_oss")
    if problem and harmony:
        raise ValueError(f"--default-chat-template-kwargs: {harmony} render harmony's prompt: {problem}")


def _cannot_start(e: Exception, what: str = "cannot load model") -> int:
    log.error("%s: %s", what, e)
    print(f"gptserve: error: {e}", file=sys.stderr)
    return 2


def _drained(signum: int, frame: object) -> None:
    """uvicorn drains in-flight requests on SIGTERM/SIGINT, then raises the signal again once it has restored
    the handlers it found: landing here, after a clean shutdown, makes the exit status 0 rather than -15."""


def with_resolved_tokenizer(config: ServerConfig) -> ServerConfig:
    """--tokenizer's hub id or folder, resolved once to the folder every process then loads it from."""
    if config.load.tokenizer is None:
        if config.hub.tokenizer_revision is not None:
            raise ValueError("--tokenizer-revision is a revision of --tokenizer's hub id; the model's own tokenizer "
                             "comes from --revision's snapshot")
        return config
    if len(config.models) > 1:
        raise ValueError("--tokenizer names the one model's tokenizer; with several models each keeps its own")
    from server.model_source import resolve_tokenizer_spec

    directory = resolve_tokenizer_spec(config.load.tokenizer, config.hub)
    return replace(config, load=replace(config.load, tokenizer=str(directory)))


def load_models(config: ServerConfig) -> dict[str, LoadedModel]:
    """Every model loaded in this process, one at a time (the server loads each in its engine core instead)."""
    from server.engine.core_process import load_served_model

    config = with_resolved_tokenizer(config)

    return {source.name: load_served_model(source.directory, config) for source in checked_sources(config)}


def checked_sources(config: ServerConfig) -> list[ModelSource]:
    """Resolve every spec first (cheap, fails fast) and refuse combinations no model could be served with."""
    sources = model_sources(config)
    if config.parallel.tensor_parallel_size > 1 and len(sources) > 1:
        raise ValueError("--tensor-parallel-size > 1 serves a single --model")
    if config.parallel.tensor_parallel_size > 1 and config.load.cpu_weight_dtype != "float32":
        raise ValueError("--cpu-weight-dtype bfloat16 is for a single process (not --tensor-parallel-size > 1)")
    if config.served_model_names:
        from server.model_source import ModelSource

        if len(sources) != 1:
            raise ValueError("--served-model-name names the one model served; with several, give each --model as "
                             "NAME=PATH")
        sources = [ModelSource(config.served_model_names[0], sources[0].directory, sources[0].root)]
        names = list(config.served_model_names)
    else:
        names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"served names must be unique, {duplicates} given twice (use NAME=PATH)")
    return sources


def model_sources(config: ServerConfig) -> list[ModelSource]:
    from server.model_source import default_model_source, resolve_model_spec

    return [resolve_model_spec(spec, config.hub) for spec in config.models] or [default_model_source(config.hub)]
