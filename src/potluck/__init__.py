"""potluck: run and fine-tune large language models on a swarm of unreliable machines."""

from typing import Any

from potluck.errors import (
    BadRequestError,
    DeadlineExceededError,
    LimitExceededError,
    MissingBlocksError,
    ModelMismatchError,
    PotluckError,
    RequestError,
    RetriesExhaustedError,
    SwarmError,
    TransportError,
    UnknownAdapterError,
)

__version__ = "0.1.0"

__all__ = [
    "AutoDistributedModelForCausalLM",
    "BadRequestError",
    "DeadlineExceededError",
    "LimitExceededError",
    "MissingBlocksError",
    "ModelMismatchError",
    "PotluckError",
    "RequestError",
    "RetriesExhaustedError",
    "SwarmError",
    "TransportError",
    "UnknownAdapterError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import potluck` stays cheap (CLI start-up, wire-only tools) until the client is used.
    if name == "AutoDistributedModelForCausalLM":
        from potluck.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(name)
