"""``potluck demo``: a local swarm of real processes, a streamed generation, one failover, clean stop."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

from potluck.cli.local_swarm import LocalSwarm


class _DemoStreamer:
    """Prints tokens as they come and kills a server once ``kill_after`` tokens were streamed."""

    def __init__(self, tokenizer: Any, on_token: Any):
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.prompt_seen = False
        self.count = 0

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        text = self.tokenizer.decode(value.reshape(-1).tolist())
        print(text, end="", flush=True)
        self.count += 1
        self.on_token(self.count)

    def end(self) -> None:
        print(flush=True)


def _say(text: str) -> None:
    print(f"\033[1m[demo]\033[0m {text}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from potluck import AutoDistributedModelForCausalLM
    from potluck.cli.sample_models import demo_model_path
    from potluck.cli.status import render_status, snapshot_report
    from potluck.client.generation import GenerationParams, generate_tokens
    from potluck.models import LocalCausalLM, load_config

    t_start = time.perf_counter()
    model_path = args.model or demo_model_path()
    num_blocks = int(load_config(model_path).num_hidden_layers)
    half = num_blocks // 2
    spans = [(0, half), (half, num_blocks), (max(0, half - 1), num_blocks)]
    with tempfile.TemporaryDirectory(prefix="potluck-demo-") as logs, LocalSwarm(logs) as swarm:
        _say(f"model {model_path} ({num_blocks} blocks); starting a bootstrap peer and {len(spans)} servers")
        swarm.start_bootstrap()
        servers = [
            swarm.start_server(
                model_path, span, name=f"server{i}", wait=False, extra_args=["--update-period", "5"]
            )
            for i, span in enumerate(spans)
        ]
        swarm.wait_ready(servers)
        for s in servers:
            _say(f"server {s.name}: peer …{s.peer_id[-8:]} holds blocks {s.info['start']}:{s.info['end']}")
        model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers)
        try:
            model.loop.run(model.view.refresh(), timeout=30)
            print(render_status(snapshot_report(model.view.snapshot)), flush=True)
            tok = model.tokenizer
            input_ids = tok(args.prompt, return_tensors="pt").input_ids
            max_new = args.max_new_tokens
            kill_at = None if args.no_failover else max(1, max_new // 3)
            killed: list[str] = []

            with model.inference_session(max_length=input_ids.shape[1] + max_new) as session:
                route = [(h.peer_id, h.hop.start, h.hop.end) for h in session.remote.hops]
                _say("route: " + " -> ".join(f"…{p[-8:]}[{a}:{b}]" for p, a, b in route))

                def on_token(count: int) -> None:
                    if kill_at is not None and count == kill_at and not killed:
                        victim_id = session.remote.hops[-1].peer_id
                        victim = next(s for s in servers if s.peer_id == victim_id)
                        print(flush=True)
                        _say(f"killing {victim.name} (…{victim_id[-8:]}) with SIGKILL mid-generation")
                        swarm.kill(victim)
                        killed.append(victim_id)

                _say(f"prompt: {args.prompt!r}; streaming {max_new} tokens")
                print(args.prompt, end="", flush=True)
                t0 = time.perf_counter()
                out = model.generate(input_ids, max_new_tokens=max_new, streamer=_DemoStreamer(tok, on_token))
                dt = time.perf_counter() - t0
                new = out.shape[1] - input_ids.shape[1]
                _say(
                    f"{new} tokens in {dt:.2f}s ({new / dt:.1f} tokens/s), {session.remote.failovers} failover(s)"
                )
                if killed:
                    route = [(h.peer_id, h.hop.start, h.hop.end) for h in session.remote.hops]
                    _say("route after failover: " + " -> ".join(f"…{p[-8:]}[{a}:{b}]" for p, a, b in route))

            local = LocalCausalLM.from_pretrained(model_path)
            cache = local.new_cache(1, out.shape[1])
            params = GenerationParams.from_kwargs(None, max_new_tokens=max_new, eos_token_id=tok.eos_token_id)
            with torch.inference_mode():
                expected = generate_tokens(lambda ids: local.step(ids, cache)[:, -1], input_ids, params)
            same = torch.equal(expected, out)
            _say(f"swarm output equals a local run of the same model: {'yes' if same else 'NO'}")
        finally:
            model.shutdown()
        _say("stopping every process the demo started")
    _say(f"done in {time.perf_counter() - t_start:.1f}s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(
        run_demo(argparse.Namespace(model=None, prompt="The swarm is", max_new_tokens=48, no_failover=False))
    )
