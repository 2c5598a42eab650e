"""What servers announce in the DHT, and a parsed, immutable snapshot of the swarm built from it.

DHT layout (same shape as Petals, our own encoding):

* key    = ``block_key(model_prefix, i)`` = ``"{model_prefix}.{i}"``, one key per transformer block;
* subkey = the announcing server's base58 libp2p peer id;
* value  = ``record_to_dht(ServerRecord)``: a small JSON-able dict describing the server's *whole* span, so the
  same record is written under every block the server holds.

Everything read from the DHT is untrusted: ``parse_record`` validates strictly (no str->int coercion, finite
non-negative numbers, bounded strings and containers) and returns ``None`` instead of raising, so one broken or
hostile peer cannot break a client's view of the swarm. Unknown fields are ignored so that newer servers can
add fields without breaking older clients.

``SwarmSnapshot`` is the input of placement and routing (``routing.py``): a plain value, testable without a network.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Any, NewType

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

PeerIdStr = NewType("PeerIdStr", str)
"""A libp2p peer id in its base58 text form (what hivemind's ``PeerID.to_base58()`` returns)."""

# Bounds on untrusted input. Generous for honest servers, small enough that a hostile record stays cheap.
MAX_BLOCKS = 100_000  # no real model has more blocks; also bounds span arithmetic
MAX_NAME_CHARS = 64  # public_name, version
MAX_DTYPE_CHARS = 32
MAX_PEER_ID_CHARS = 128  # base58 peer ids are ~46-52 chars
MAX_ADAPTERS = 32
MAX_ADAPTER_CHARS = 256  # adapters are HF repo ids / paths
MAX_NEXT_PINGS = 64
MAX_RAW_JSON_BYTES = 64 * 1024  # parse_record also accepts JSON text; refuse anything absurdly large
MAX_PREFIX_CHARS = 128
MAX_MADDRS = 8  # libp2p addresses shown by `potluck status`
MAX_MADDR_CHARS = 256
MAX_LISTED_MODELS = 256  # models `potluck status` and the dashboard list from MODELS_KEY

_Count = Annotated[int, Field(strict=True, ge=0, le=1 << 40)]
_Block = Annotated[int, Field(strict=True, ge=0, le=MAX_BLOCKS)]
_Rate = Annotated[float, Field(strict=True, ge=0.0, allow_inf_nan=False)]
_PeerKey = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_PEER_ID_CHARS)]


class ServerState(StrEnum):
    """Lifecycle of a server as announced in its records."""

    joining = "joining"  # loading blocks; counts for placement (so joiners spread out), not for routing
    online = "online"  # serving requests
    offline = "offline"  # shutting down or moving; announced so clients stop routing to it before expiry


class ServerRecord(BaseModel):
    """One server's announcement, identical under every block key of its span.

    Rates are per block and measured by the server itself (not trusted for anything but ranking).
    """

    model_config = ConfigDict(
        frozen=True, extra="ignore"
    )  # extra="ignore": forward compatible with newer servers

    state: ServerState  # lifecycle state; only ``online`` servers are routed to
    start: _Block  # first block of the server's whole span (inclusive)
    end: _Block  # end of the span (exclusive); a server may run any sub-range of [start, end)
    throughput: _Rate  # tokens/s the server contributes to each block of its span; used for load balancing
    # one-token decode steps per second per block (batch 1, with KV cache); 0 = unmeasured
    inference_rps: _Rate
    forward_rps: _Rate  # tokens/s per block for forward / prefill (large batches); 0 = unmeasured
    network_rps: _Rate  # tokens/s of hidden states its network link can carry; 0 = unmeasured
    # free KV-cache room in batch*tokens that a new session over the whole span may take
    cache_tokens_left: _Count
    max_inference_length: _Count  # largest max_length (tokens) an inference session may ask for
    dtype: Annotated[
        str, Field(strict=True, min_length=1, max_length=MAX_DTYPE_CHARS)
    ]  # torch dtype, "bfloat16"
    version: Annotated[str, Field(strict=True, max_length=MAX_NAME_CHARS)]  # potluck version of the server
    public_name: Annotated[str, Field(strict=True, max_length=MAX_NAME_CHARS)] | None = None  # display name
    adapters: Annotated[
        tuple[Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ADAPTER_CHARS)], ...],
        Field(max_length=MAX_ADAPTERS),
    ] = ()  # LoRA adapters the server can apply per request
    direct_addrs: Annotated[
        tuple[Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9.\-\[\]:]{1,80}:[0-9]{1,5}$")], ...],
        Field(max_length=4),
    ] = ()  # "host:port" of the server's plain-TCP data path, if it has one (see swarm/direct.py)
    maddrs: Annotated[
        tuple[Annotated[str, Field(strict=True, min_length=1, max_length=MAX_MADDR_CHARS)], ...],
        Field(max_length=MAX_MADDRS),
    ] = ()  # the server's libp2p multiaddrs, for humans (`potluck status`); clients dial by peer id
    # quantization of the span's linear layers (none | int8 | nf4; see models/quant.py); older servers: none
    quant: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_DTYPE_CHARS)] = "none"
    block_bytes: _Count = (
        0  # bytes of weights one block takes in the server's memory (quantized size); 0 = unknown
    )
    announced_at: _Rate = 0.0  # DHT time of this announcement; a peer's newest record wins (0 = unknown)
    # largest batch*tokens one step / forward may carry on this server; 0 = not announced (older servers)
    max_batch_tokens: _Count = 0
    # checkpoint fingerprint "config-hash.weights-hash" (models/fingerprint.py); None = not announced
    fingerprint: Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{1,64}\.[0-9a-f]{1,64}$")] | None = None
    next_pings: Annotated[dict[_PeerKey, _Rate], Field(max_length=MAX_NEXT_PINGS)] = {}
    # ^ RTT in seconds from this server to peers holding the block right after its span, measured by the server
    #   (push handshakes, info pings; server/push.py); push routing prices server-to-server legs with it

    @model_validator(mode="after")
    def _check_span(self) -> ServerRecord:
        if not self.start < self.end:
            raise ValueError(f"empty or reversed span {self.start}:{self.end}")
        return self

    @property
    def length(self) -> int:
        return self.end - self.start


# --- which models a swarm serves ------------------------------------------------------------------------------

MODELS_KEY = "_potluck.models"
"""DHT key under which every server also announces its model: subkey = the server's peer id (records are signed by
the peer their subkey names, see ``signing.py``), value = ``ModelRecord`` naming the model prefix.
``potluck status`` without a model reads it to list what the swarm serves. (Not a block key: "models" is no index.)"""


class ModelRecord(BaseModel):
    """What a server says about the model it serves, under ``MODELS_KEY``; identical for all its servers."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    prefix: Annotated[str, Field(strict=True, pattern=_PREFIX_RE.pattern, max_length=MAX_PREFIX_CHARS)]
    num_blocks: Annotated[int, Field(strict=True, ge=1, le=MAX_BLOCKS)]  # transformer blocks of the model
    # the hub id the server loaded, if it was one (local paths are not announced)
    name: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ADAPTER_CHARS)] | None = None


def parse_model_record(raw: object) -> ModelRecord | None:
    """Validate one value under ``MODELS_KEY``; ``None`` for anything malformed; never raises."""
    try:
        if isinstance(raw, Mapping):
            return ModelRecord.model_validate(dict(raw))
    except Exception:  # a hostile value must never break `potluck status`
        logger.debug("ignoring malformed model record", exc_info=True)
    return None


# --- DHT layout -------------------------------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def _check_prefix(prefix: str) -> str:
    # "." separates prefix from block index in keys, so it may not appear in the prefix itself.
    if not (0 < len(prefix) <= MAX_PREFIX_CHARS) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"invalid DHT model prefix {prefix!r}: use 1-{MAX_PREFIX_CHARS} chars of [A-Za-z0-9_-]"
        )
    return prefix


def is_valid_prefix(prefix: str) -> bool:
    return 0 < len(prefix) <= MAX_PREFIX_CHARS and bool(_PREFIX_RE.match(prefix))


def block_key(model_prefix: str, block: int) -> str:
    """DHT key under which servers announce block ``block`` of the model: ``"{model_prefix}.{block}"``."""
    if block < 0:
        raise ValueError(f"block index must be >= 0, got {block}")
    return f"{model_prefix}.{block}"


def model_prefix_for(name_or_path: str, override: str | None = None) -> str:
    """Stable DHT prefix for a model: the last path component (no org / directories), ``.`` -> ``-``.

    "meta-llama/Llama-2-7b-hf" -> "Llama-2-7b-hf"; "/data/models/Qwen2.5-0.5B/" -> "Qwen2-5-0-5B".
    Servers of the same model loaded from different places (hub id vs local copy) thus join one swarm;
    ``override`` (e.g. ``--dht-prefix``) is returned as is after validation, for private swarms or forks.
    """
    if override is not None:
        return _check_prefix(override)
    last = name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    prefix = re.sub(r"[^A-Za-z0-9_\-]", "-", last.replace(".", "-"))
    return _check_prefix(prefix)


def record_to_dht(record: ServerRecord) -> dict[str, Any]:
    """Compact JSON-able (and msgpack-able) form of a record: defaults are left out, enums become strings."""
    return record.model_dump(mode="json", exclude_defaults=True)


def parse_record(raw: object) -> ServerRecord | None:
    """Validate one DHT value. Returns ``None`` for anything malformed or unknown; never raises."""
    try:
        if isinstance(raw, ServerRecord):
            return raw
        if isinstance(raw, (bytes, bytearray, str)):
            if len(raw) > MAX_RAW_JSON_BYTES:
                logger.debug("ignoring oversized DHT record (%d bytes)", len(raw))
                return None
            raw = json.loads(raw)
        if not isinstance(raw, Mapping):
            logger.debug("ignoring DHT record of type %s", type(raw).__name__)
            return None
        return ServerRecord.model_validate(dict(raw))
    except (ValidationError, ValueError, TypeError, RecursionError) as e:
        logger.debug("ignoring malformed DHT record: %s", str(e)[:500])
        return None
    except Exception:  # a hostile value must never break a client; log and drop
        logger.debug("ignoring DHT record that failed to parse", exc_info=True)
        return None


# --- snapshot ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpan:
    """A server and the record it announced; the span is the record's [start, end)."""

    peer_id: PeerIdStr
    record: ServerRecord

    @property
    def start(self) -> int:
        return self.record.start

    @property
    def end(self) -> int:
        return self.record.end

    @property
    def length(self) -> int:
        return self.record.end - self.record.start

    @property
    def state(self) -> ServerState:
        return self.record.state


ONLINE_ONLY: tuple[ServerState, ...] = (ServerState.online,)
# Placement counts joining servers so that servers starting at the same time spread out instead of all taking
# the same weakest window (Petals does the same); offline ones are on their way out and count for nothing.
PLACEMENT_STATES: tuple[ServerState, ...] = (ServerState.online, ServerState.joining)


def _pick_record(found: Mapping[int, ServerRecord]) -> ServerRecord | None:
    """Choose one record for a peer from the records found under each block key.

    Records carry no timestamp, so "newest" is inferred from the DHT's overwrite rule: a server writes its record
    under every block of its span with the same subkey, so record X is *superseded* if another record of the same
    peer sits under a block inside X's span (the newer write replaced X there; X survives only on blocks the server
    no longer announces, until it expires). Among non-superseded records (all of them, if replicas disagree in a
    cycle) take the one found under the most blocks, then the smallest canonical JSON, so the choice is
    deterministic. Records found under a block outside their own span are inconsistent and dropped earlier.
    """
    by_key: dict[str, tuple[ServerRecord, list[int]]] = {}
    for block, rec in found.items():
        key = json.dumps(record_to_dht(rec), sort_keys=True)
        by_key.setdefault(key, (rec, []))[1].append(block)
    if not by_key:
        return None
    newest = max(rec.announced_at for rec, _ in by_key.values())
    if newest > 0:  # timestamped records (servers that move announce them): the latest announcement wins
        by_key = {k: v for k, v in by_key.items() if v[0].announced_at == newest}
    if len(by_key) == 1:
        return next(iter(by_key.values()))[0]

    def superseded(key: str) -> bool:
        rec = by_key[key][0]
        return any(
            rec.start <= b < rec.end for other, (_, blocks) in by_key.items() if other != key for b in blocks
        )

    candidates = [k for k in by_key if not superseded(k)] or list(by_key)
    best = min(candidates, key=lambda k: (-len(by_key[k][1]), k))
    return by_key[best][0]


@dataclass(frozen=True)
class SwarmSnapshot:
    """Immutable view of the servers of one model at ``taken_at``; ``servers`` is sorted by peer id."""

    model_prefix: str
    num_blocks: int
    servers: Mapping[PeerIdStr, ServerSpan] = field(default_factory=dict)
    taken_at: float = 0.0

    def __post_init__(self) -> None:
        # Sort by peer id and freeze, so iteration order never depends on how the mapping was built.
        ordered = {pid: self.servers[pid] for pid in sorted(self.servers)}
        object.__setattr__(self, "servers", MappingProxyType(ordered))

    @classmethod
    def from_records(
        cls, model_prefix: str, num_blocks: int, records: Mapping[str, ServerRecord], now: float
    ) -> SwarmSnapshot:
        """Build from already parsed records (tests, simulations); spans beyond ``num_blocks`` are dropped."""
        servers = {
            PeerIdStr(pid): ServerSpan(PeerIdStr(pid), rec)
            for pid, rec in records.items()
            if rec.end <= num_blocks
        }
        return cls(model_prefix, num_blocks, servers, now)

    @classmethod
    def from_block_entries(
        cls,
        model_prefix: str,
        num_blocks: int,
        entries: Mapping[int, Mapping[str, object]],
        now: float,
    ) -> SwarmSnapshot:
        """Build from raw DHT reads: ``entries[block][peer_id] = raw value`` (as fetched for ``block_key``).

        Malformed values, records whose span does not contain the block they were found under, and spans that
        extend past ``num_blocks`` are dropped (at debug level). If one peer's records disagree across blocks,
        see ``_pick_record``.
        """
        found: dict[str, dict[int, ServerRecord]] = {}
        for block, by_peer in entries.items():
            if not isinstance(block, int) or not 0 <= block < num_blocks or not isinstance(by_peer, Mapping):
                continue
            for peer_id, raw in by_peer.items():
                if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
                    continue
                rec = parse_record(raw)
                if rec is None:
                    continue
                if not rec.start <= block < rec.end or rec.end > num_blocks:
                    logger.debug(
                        "ignoring record of %s under block %d: span %d:%d", peer_id, block, rec.start, rec.end
                    )
                    continue
                found.setdefault(peer_id, {})[block] = rec
        records: dict[str, ServerRecord] = {}
        for peer_id, per_block in found.items():
            picked = _pick_record(per_block)
            if picked is not None:
                records[peer_id] = picked
        return cls.from_records(model_prefix, num_blocks, records, now)

    # --- queries --------------------------------------------------------------------------------------------

    def servers_for_block(
        self, block: int, states: Collection[ServerState] = ONLINE_ONLY
    ) -> list[ServerSpan]:
        """Servers in one of ``states`` whose span contains ``block``, sorted by peer id."""
        return [s for s in self.servers.values() if s.start <= block < s.end and s.state in states]

    def _per_block(self, states: Collection[ServerState]) -> Iterable[tuple[ServerSpan, range]]:
        for span in self.servers.values():
            if span.state in states:
                yield span, range(max(span.start, 0), min(span.end, self.num_blocks))

    def coverage(self, states: Collection[ServerState] = ONLINE_ONLY) -> list[int]:
        """Number of servers (online by default) holding each block."""
        counts = [0] * self.num_blocks
        for _, blocks in self._per_block(states):
            for b in blocks:
                counts[b] += 1
        return counts

    def missing_blocks(self, states: Collection[ServerState] = ONLINE_ONLY) -> list[int]:
        """Blocks that no server in ``states`` holds, ascending."""
        return [b for b, n in enumerate(self.coverage(states)) if n == 0]

    def block_throughputs(self, states: Collection[ServerState] = PLACEMENT_STATES) -> list[float]:
        """Per block, the summed ``throughput`` of servers holding it; online and joining count by default."""
        totals = [0.0] * self.num_blocks
        for span, blocks in self._per_block(states):
            for b in blocks:
                totals[b] += span.record.throughput
        return totals

    def without(self, peer_ids: Iterable[str]) -> SwarmSnapshot:
        """The same snapshot minus some peers (e.g. a server leaving out itself when choosing where to move)."""
        drop = set(peer_ids)
        kept = {pid: s for pid, s in self.servers.items() if pid not in drop}
        return SwarmSnapshot(self.model_prefix, self.num_blocks, kept, self.taken_at)
