"""Everything the daemon is started with: one tree, built once by the CLI and handed down in sections.

Each setting lives in exactly one section; a reader takes the section it needs (the engine ``config.engine``,
the HTTP gateway ``config.http``, the tensor-parallel ranks ``config.load``/``config.engine``/``config.parallel``)
rather than a copy of its fields. Every section is frozen and picklable: spawned ranks receive them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelLoadConfig:
    """How the weights are read and placed."""

    dtype: str = "auto"
    device: str = "auto"
    cpu_weight_dtype: str = "float32"  # bfloat16: weights rounded to bf16 and streamed as bf16 in decode steps
    keep_experts_packed: bool | None = None  # GPT-OSS experts stay MXFP4; None: on CPU only (models/loader.py)
    tokenizer: str | None = None  # the tokenizer's folder (a hub id until resolved at start); None: the model's


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Which revision of a HuggingFace hub model is served, where its files are kept, and the token to fetch them."""

    revision: str | None = None  # a branch, tag or commit of every model given as a hub id; None: main
    tokenizer_revision: str | None = None  # of --tokenizer's hub id; None: revision
    download_dir: str | None = None  # the hub cache to read and fill; None: huggingface_hub's (HF_HUB_CACHE)
    hf_token: str | bool | None = field(default=None, repr=False)  # True: the saved login's; None: the hub's rule


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One engine's scheduling limits and KV cache."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget: a long prompt is prefilled in chunks of this
    max_model_len: int | None = None  # default: the model's context length
    kv_cache_tokens: int | None = None  # default: sized from free memory
    block_size: int = 16
    max_queue: int = 1024
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # fcfs: arrival order; priority: by each request's priority, then arrival
    kv_memory_fraction: float = 0.25  # of free memory at start-up, when kv_cache_tokens is not given
    gpu_memory_utilization: float | None = None  # vLLM's: in place of kv_memory_fraction, the device's share in use
    enforce_eager: bool = False  # never replay decode steps from CUDA graphs
    kv_cache_dtype: str = "auto"  # the pool's dtype: auto (the model's) or a name in models.kv_cache.KV_CACHE_DTYPES


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    tp_step_timeout: float = 8.0  # seconds a tensor-parallel rank may lag inside one step before the engine fails


@dataclass(frozen=True, slots=True)
class HTTPConfig:
    """The listener, its limits, and who may call it."""

    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None  # listen on this Unix domain socket instead of host:port
    api_keys: tuple[str, ...] = ()  # any one of them lets a request in; none: no key asked for
    metrics_require_key: bool = False  # /metrics is open to scrapers unless asked
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins let in ("*": any); none: no CORS headers
    allowed_methods: tuple[str, ...] = ("GET", "POST", "DELETE")  # what their preflights may ask for
    allowed_headers: tuple[str, ...] = ("*",)  # request headers their preflights may ask for; "*": any
    allow_credentials: bool = False  # browsers may send cookies and HTTP authentication to those origins
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is kept
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive
    body_timeout: float = 30.0  # seconds a request's body may take to arrive, once its headers have
    max_connections: int = 1024  # open connections; a request arriving over this gets 503
    drain_timeout: float = 30.0  # on SIGTERM, seconds in-flight requests get before they are aborted with 503
    log_requests: bool = False  # prompts (request bodies) go to the log only when asked for
    log_outputs: bool = False  # as do the outputs: each choice's text, tokens and finish_reason
    disable_access_log: bool = False  # no log line per request
    disable_access_log_for_endpoints: tuple[str, ...] = ()  # paths whose requests get no log line (probes)
    max_log_len: int = 4096  # bytes of a logged request body (--log-requests), characters of a logged output
    root_path: str = ""  # the path prefix a proxy serves the API under (/docs and the OpenAPI document name it)
    disable_fastapi_docs: bool = False  # no /docs, /redoc or /openapi.json
    middleware: tuple[str, ...] = ()  # import paths of ASGI middleware (or async functions) run inside the gateway
    enable_server_load_tracking: bool = False  # GET /load counts the requests in flight that run a model
    ssl_certfile: str | None = None  # with ssl_keyfile: serve HTTPS with this certificate (chain)
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None  # CA certificates that client certificates are verified against
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE, CERT_OPTIONAL or CERT_REQUIRED: whether clients present a certificate
    ssl_ciphers: str | None = None  # OpenSSL's cipher list for TLS 1.2 and below; None: uvicorn's
    enable_ssl_refresh: bool = False  # reload the certificate, key and CAs when their files change


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """What requests may ask for and how answers are shaped: the front end's (vLLM's FrontendArgs)."""

    chat_template: str | None = None  # a file path or the template text itself, for models without harmony
    trust_request_chat_template: bool = False  # requests may bring their own chat template (vLLM's flag)
    tool_call_parser: str = "none"  # "hermes": a template model's <tool_call> JSON is read as tool calls
    reasoning_parser: str = "none"  # "openai_gptoss" (vLLM's name for harmony's reasoning): GPT-OSS only
    enable_auto_tool_choice: bool = True  # tool_choice "auto" allowed (vLLM's flag; there it must be given)
    enable_force_include_usage: bool = False  # every stream ends with a usage chunk, asked for or not (vLLM's flag)
    max_logprobs: int = 20  # most alternatives a token a request may ask for (vLLM's flag; -1: the vocabulary)
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # under each request's own
    response_role: str = "assistant"  # the role of chat's answers to a prompt that asks for a new message
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" unless a request says otherwise


@dataclass(frozen=True, slots=True)
class ServerConfig:
    models: tuple[str, ...] = ()  # --model specs; empty: the default gpt2
    served_model_names: tuple[str, ...] = ()  # --served-model-name: the one model's names, the first its own
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    seed: int | None = None
    log_level: str = "info"
    uvicorn_log_level: str | None = None  # uvicorn's own loggers (start, stop, connection errors); None: log_level
    disable_log_stats: bool = False  # no periodic throughput and queue line per model (vLLM's flag)
    log_stats_interval: float = 10.0  # seconds between those lines
    generation_config: str = "auto"  # auto | vllm | a folder: where the models' generation_config.json is read
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # sampling defaults set over it


SECTIONS = {"load": ModelLoadConfig, "hub": HubConfig, "engine": EngineConfig, "parallel": ParallelConfig,
            "http": HTTPConfig, "frontend": FrontendConfig}
