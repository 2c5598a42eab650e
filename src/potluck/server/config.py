"""The server's typed configuration; ``potluck serve`` maps its flags onto it one to one."""

from __future__ import annotations

from dataclasses import dataclass, field

from potluck.swarm.node_options import NodeOptions


@dataclass(frozen=True)
class ServerConfig:
    model: str  # HF hub name or local directory of the checkpoint (safetensors)
    blocks: tuple[int, int] | None = None  # the span [start, end) to serve; None: choose from the swarm
    num_blocks: int | None = None  # how many blocks to choose when ``blocks`` is None
    node: NodeOptions = field(default_factory=NodeOptions)  # how to join the swarm
    model_prefix: str | None = None  # DHT name of the model; default derived from ``model``
    device: str = "cpu"  # torch device for the blocks and caches
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 on CPU)
    # linear layers of the blocks: none | int8 | nf4 (bitsandbytes) | auto (nf4 on CUDA where the span would not
    # fit in bf16, else none); `dtype` stays the compute dtype of the norms, activations and KV cache
    quant: str = "none"
    # fp32 blocks on CPU: linear weights take oneDNN's packed layout while steps batch rows (models/cpu_linear.py),
    # so a batch of sessions' decode steps costs ~2x one step instead of ~4x (MKL on non-Intel CPUs), and
    # PyTorch's dense layout after a run of one-row steps (faster for a lone session on Intel); False: plain F.linear
    prepack: bool = True
    revision: str | None = None  # hub revision of the checkpoint
    token: str | None = None  # hub token for gated models
    public_name: str | None = None  # a human name shown by `potluck status`
    cache_tokens: int = 16384  # KV-cache budget: sum over open sessions of batch * max_length
    max_inference_length: int = 8192  # largest max_length one session may reserve
    max_batch_tokens: int = 16384  # largest batch * tokens one step / forward may carry
    max_alloc_timeout: float = 600.0  # cap on how long a session may wait for cache room
    step_timeout: float = 300.0  # an inference session idle longer than this between steps is closed
    session_timeout: float = 3600.0  # hard cap on an inference session's lifetime
    request_timeout: float = 300.0  # cap on receiving one forward/backward request
    update_period: float = 15.0  # re-announce the DHT records this often (seconds)
    expiration: float = 45.0  # records expire this long after each announcement unless refreshed
    drain_timeout: float = 10.0  # on SIGTERM, wait this long for in-flight steps before exiting
    throughput: float | None = None  # announced tokens/s per block; None: measure at start
    compression: str = "none"  # default compression of replies when the client does not ask
    direct_port: int | None = 0  # plain-TCP data path beside libp2p (0: any free port; None: off)
    # push step outputs straight to the next server when a client asks (server/push.py) and accept pushes from
    # the previous one; False: refuse both, so clients relay every hop through themselves
    push: bool = True
    bandwidth_mbps: float = 100.0  # this server's network bandwidth, for the announced network throughput
    balance_quality: float = 0.75  # move only if the swarm's throughput would grow past 1/this; 0: never move
    balance_check_period: float = 60.0  # check for a better span about this often (randomised +-50%)
    start_delay_max: float = 5.0  # with automatic placement, wait up to this long (random) before choosing
    # KV-cache tokens that one client peer's sessions may hold together, so one client cannot take the whole
    # budget; None: half of cache_tokens, or one max_inference_length session if that is more
    peer_cache_tokens: int | None = None
    peer_sessions: int = 64  # inference sessions one client peer may hold open at once (more are refused)
    # when a session open does not fit the cache budget, sessions idle (no step) for this many seconds whose client
    # holds more than its fair share (budget / clients holding sessions) are closed, longest idle first, to make
    # room; their clients get ``evicted`` on the next step and re-open elsewhere (or here, once there is room)
    evict_idle_after: float = 15.0
    # rows x tokens of one piece of a forward/backward on the compute thread: larger ones are split (by rows, and
    # by tokens for forwards without a graph) so other clients' inference steps wait at most one piece
    forward_chunk_tokens: int = 1024
    # rows x tokens one batched forward of inference steps may carry; longer prefills are cut into chunks of
    # this size that run between other sessions' decode steps (continuous batching, chunked prefill)
    step_token_budget: int = 256
    # a decode-only batch waits up to this long (ms) for the steps of the sessions whose chains start here, or
    # for the rest of a burst from the previous server (server/scheduler.py:gather_until): larger batches for
    # the price of at most this much latency; 0: never
    batch_wait_ms: float = 80.0
    adapters: tuple[str, ...] = ()  # PEFT LoRA adapter dirs to preload; clients pick one by its dir name
    # payload bytes of incoming frames buffered at once over all streams; past it, frames are refused at the header
    inflight_frame_bytes: int = 2 << 30
    activation_bytes: int = 2 << 30  # training graphs kept for backward, in bytes; oldest evicted first
    # private swarm and connection limits: see ``node`` (NodeOptions.swarm_key_path, max_streams_per_peer/_total)
    metrics_port: int | None = None  # serve Prometheus /metrics on this port of node.host (0: any; None: off)


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANT_CHOICES = ("none", "int8", "nf4", "auto")
