"""HTTP surface of potluck: an OpenAI-compatible API over the swarm, a live swarm dashboard and metrics."""
