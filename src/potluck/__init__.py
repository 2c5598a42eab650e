"""potluck: run and fine-tune large language models on a swarm of unreliable machines."""

__version__ = "0.1.0"
