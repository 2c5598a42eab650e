"""potluck.client: the HF-style model whose blocks run in the swarm."""

from potluck.client.config import ClientConfig
from potluck.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM

__all__ = ["AutoDistributedModelForCausalLM", "ClientConfig", "DistributedModelForCausalLM"]
