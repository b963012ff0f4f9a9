"""Everything the daemon is started with, as one plain record built by the CLI and read by the app."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class ServerConfig:
    models: list[str] = field(default_factory=list)  # --model specs; empty: the default gpt2
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    cpu_weight_dtype: str = "float32"  # bfloat16: weights rounded to bf16 and streamed as bf16 in decode steps
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    block_size: int = 16
    max_queue: int = 1024
    tensor_parallel_size: int = 1
    api_key: str | None = None
    metrics_require_key: bool = False  # /metrics is open to scrapers unless asked
    allowed_origins: list[str] = field(default_factory=list)  # CORS: browser origins let in; none: no CORS headers
    seed: int | None = None
    log_level: str = "info"
    chat_template: str | None = None  # a file path or the template text itself, for models without harmony
    keep_experts_packed: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_requests: bool = False  # prompts and outputs go to the log only when asked for
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; bfloat16 halves the KV cache under a float32 model
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is kept
    header_timeout: float = 10.0  # seconds a request's headers may take to arrive
    body_timeout: float = 30.0  # seconds a request's body may take to arrive, once its headers have
    max_connections: int = 1024  # open connections; a request arriving over this gets 503
    tp_step_timeout: float = 8.0  # seconds a tensor-parallel rank may lag inside one step before the engine fails
    drain_timeout: float = 30.0  # on SIGTERM, seconds in-flight requests get before they are aborted with 503
