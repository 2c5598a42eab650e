"""``potluck api``, ``potluck chat`` and ``potluck dashboard``: the HTTP and terminal front ends of the client.

Parsers are added by ``main.py`` through ``add_parsers``; heavy imports (torch, FastAPI) happen inside the
handlers so ``potluck --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("potluck")

READY_PREFIX = "POTLUCK_READY "  # same readiness line as servers print, for LocalSwarm and scripts


def add_parsers(sub: Any, add_network: Callable[..., None]) -> None:
    p = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API (and the dashboard) for a model")
    p.add_argument("model", help="HF hub name or local checkpoint directory (client parts and tokenizer)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="swarm peers to join")
    p.add_argument("--host", default="127.0.0.1", help="HTTP interface (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port, printed when ready)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("POTLUCK_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* (default: $POTLUCK_API_KEY; unset: no key)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="Jinja chat template file (default: tokenizer's)",
    )
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: MODEL)")
    p.add_argument("--max-concurrency", type=int, default=16, help="generations running at once (more wait)")
    p.add_argument("--p2p-host", default="127.0.0.1", help="interface of the client's own p2pd")
    p.add_argument(
        "--wait-for-servers",
        type=float,
        default=5.0,
        help="wait this long for missing blocks before a 503 (s)",
    )
    _client_args(p)
    _swarm_key_arg(p)
    from potluck.cli.main import add_draft_arguments  # --draft, --num-assistant-tokens (speculative decoding)

    add_draft_arguments(p)

    p = sub.add_parser("chat", help="chat with a model served by the swarm in the terminal")
    p.add_argument("model", help="HF hub name or local checkpoint directory (client parts and tokenizer)")
    add_network(p)  # --initial-peers, --host (of the client's p2pd), --swarm-key
    p.add_argument("--chat-template", default=None, metavar="FILE", help="Jinja chat template file")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: random)")
    p.add_argument(
        "--max-length", type=int, default=None, help="conversation length limit (default: context)"
    )
    _client_args(p)
    from potluck.cli.main import add_draft_arguments  # --draft, --num-assistant-tokens (speculative decoding)

    add_draft_arguments(p)

    p = sub.add_parser("dashboard", help="serve the live swarm dashboard (no model needed)")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="swarm peers to join")
    p.add_argument("--host", default="127.0.0.1", help="HTTP interface (0.0.0.0 to listen on all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port, printed when ready)")
    p.add_argument("--model", default=None, help="show only this model (default: every model announced)")
    p.add_argument("--model-prefix", default=None, help="DHT name of --model (default: from --model)")
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between swarm reads")
    _swarm_key_arg(p)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-prefix", default=None, help="DHT name of the model (default: from MODEL)")


def _swarm_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--swarm-key",
        default=None,
        metavar="FILE",
        help="private swarm: file with the secret its peers share",
    )


def _load_model(args: argparse.Namespace, **extra: Any) -> Any:
    from potluck import AutoDistributedModelForCausalLM

    host = getattr(args, "p2p_host", None) or args.host or "127.0.0.1"  # chat: --host is the p2pd's
    kwargs: dict[str, Any] = {"initial_peers": tuple(args.initial_peers), "host": host, **extra}
    if args.model_prefix:
        kwargs["model_prefix"] = args.model_prefix
    if args.swarm_key:
        kwargs["swarm_key_file"] = args.swarm_key
    return AutoDistributedModelForCausalLM.from_pretrained(args.model, **kwargs)


def _read_template(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path else None


def _serve_http(app: Any, host: str, port: int) -> None:
    """Run uvicorn until SIGINT/SIGTERM; print the bound address when listening (``--port 0`` works)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task  # failed to bind: raise its error
                return
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://{host}:{bound}"
        logger.info("listening on %s (dashboard at %s/, OpenAI API at %s/v1)", url, url, url)
        print(READY_PREFIX + json.dumps({"url": url, "port": bound}), flush=True)
        await task

    asyncio.run(run())


def api(args: argparse.Namespace) -> int:
    from potluck.api.app import create_app
    from potluck.api.engine import Engine
    from potluck.api.swarm_watch import SwarmWatch

    model = _load_model(args, wait_for_servers=args.wait_for_servers)
    try:
        speculation = None
        if args.draft:  # loaded once; every request then decodes speculatively
            from potluck.client.speculative import Speculation, load_draft

            speculation = Speculation(load_draft(args.draft), args.num_assistant_tokens)
        engine = Engine(
            model,
            max_concurrency=args.max_concurrency,
            chat_template=_read_template(args.chat_template),
            speculation=speculation,
        )
        watch = SwarmWatch(
            model.view.node, model.loop, models={model.view.model_prefix: model.view.num_blocks}
        )
        app = create_app(engine, watch, model_name=args.served_model_name or args.model, api_key=args.api_key)
        _serve_http(app, args.host, args.port)
        engine.close()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        model.shutdown()
    return 0


def dashboard(args: argparse.Namespace) -> int:
    from potluck.api.app import create_app
    from potluck.api.swarm_watch import SwarmWatch
    from potluck.client.loop import shared_loop
    from potluck.swarm.records import model_prefix_for
    from potluck.swarm.transport import NodeOptions, SwarmNode

    models: dict[str, int] = {}
    if args.model:
        from potluck.models import load_config

        models[args.model_prefix or model_prefix_for(args.model)] = int(
            load_config(args.model).num_hidden_layers
        )
    loop = shared_loop()
    node = loop.run(
        SwarmNode.create(
            NodeOptions(
                initial_peers=tuple(args.initial_peers),
                host="127.0.0.1",
                client_mode=True,
                swarm_key_path=args.swarm_key,
            )
        ),
        timeout=60,
    )
    watch = SwarmWatch(node, loop, models=models, period=args.refresh, owns_node=True)
    _serve_http(create_app(None, watch), args.host, args.port)
    return 0


def chat(args: argparse.Namespace) -> int:
    """Read a line, stream the reply; the whole conversation lives in one inference session."""
    import torch

    from potluck.api.engine import Engine, TextTracker

    model = _load_model(args)
    try:
        engine = Engine(model, chat_template=_read_template(args.chat_template))
        messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        max_length = min(args.max_length or engine.context_length, engine.context_length)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        from potluck.cli.commands import draft_kwargs

        speculation = draft_kwargs(args)  # a local draft proposes tokens the swarm checks in one step
        sampling: dict[str, Any] = {"do_sample": args.temperature > 0}
        if args.temperature > 0:
            sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=None)
        interactive = sys.stdin.isatty()
        with model.inference_session(max_length=max_length) as session:
            rendered = ""  # the conversation's text as the template wrote it so far
            while True:
                if interactive:
                    print("you> ", end="", flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                messages.append({"role": "user", "content": text})
                full = engine.render_chat(messages)
                if not full.startswith(rendered):
                    print("error: the chat template rewrites earlier turns; cannot continue", file=sys.stderr)
                    return 1
                new_ids = engine.tokenizer(
                    full[len(rendered) :], add_special_tokens=False, return_tensors="pt"
                )
                room = max_length - session.position - new_ids.input_ids.shape[1] - 1
                if room < 1:
                    print("\n[the conversation reached its length limit]", file=sys.stderr)
                    break
                streamer = _PrintStreamer(TextTracker(engine.tokenizer))
                print("assistant> ", end="", flush=True)
                out = model.generate(
                    new_ids.input_ids, session=session, max_new_tokens=min(args.max_new_tokens, room),
                    streamer=streamer, **sampling, **speculation,
                )  # fmt: skip
                print(streamer.tracker.flush(), flush=True)  # text held back for a partial character
                answer = engine.tokenizer.decode(out[0, -streamer.count :], skip_special_tokens=True)
                messages.append({"role": "assistant", "content": answer})
                rendered = engine.render_chat(messages, add_generation_prompt=False)
    finally:
        model.shutdown()
    return 0


class _PrintStreamer:
    """Prints each reply's text as its tokens arrive."""

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.prompt_seen = False
        self.count = 0

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.count += 1
        text, _ = self.tracker.add(int(value.reshape(-1)[0]))
        print(text, end="", flush=True)

    def end(self) -> None:
        pass


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"api": api, "chat": chat, "dashboard": dashboard}
