"""``potluck finetune``: train a soft prompt or LoRA adapters against a running swarm (servers stay frozen)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# A tiny default task: learn to continue these lines. Small enough to overfit in a few dozen steps.
DEFAULT_TEXTS = [
    "The swarm shares the work: each server runs a span of blocks.",
    "A client keeps the embeddings and the head, and sends hidden states on.",
    "When a server vanishes, the client replays its inputs to a replacement.",
    "Servers choose their blocks so that the whole swarm is as fast as it can be.",
]


def _dataset(model: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """Token ids [N, seq_len]: the texts tokenised and cut into equal pieces (random ids without a tokenizer)."""
    if model.tokenizer is not None:
        ids = []
        for text in texts:
            ids.extend(model.tokenizer(text).input_ids)
        flat = torch.tensor(ids, dtype=torch.long)
    else:  # no tokenizer: a learnable pattern of ids (counting upwards in a small range)
        span = min(64, int(model.config.vocab_size) - 3)
        flat = torch.arange(seq_len * 8) % span + 3
    while flat.numel() < seq_len * 4:
        flat = torch.cat([flat, flat])
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


def run_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from potluck import AutoDistributedModelForCausalLM

    kwargs: dict[str, Any] = {"initial_peers": tuple(args.initial_peers)}
    if args.host:
        kwargs["host"] = args.host
    if args.mode in ("ptune", "deep_ptune"):
        kwargs.update(tuning_mode=args.mode, pre_seq_len=args.pre_seq_len)
    else:
        kwargs.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
        if args.lora_targets:
            kwargs["lora_targets"] = tuple(args.lora_targets)
    texts = Path(args.data).read_text().splitlines() if args.data else DEFAULT_TEXTS
    texts = [t for t in texts if t.strip()]
    torch.manual_seed(args.seed)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, **kwargs)
    try:
        data = _dataset(model, texts, args.seq_len)
        params = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        print(
            f"training {count:,} client-side parameters ({args.mode}) on {data.shape[0]} sequences",
            flush=True,
        )
        optimizer = torch.optim.Adam(params, lr=args.lr)
        losses: list[float] = []
        bar = tqdm(range(args.steps), desc="finetune", unit="step", file=sys.stderr, disable=args.quiet)
        t0 = time.perf_counter()
        for step in bar:
            rows = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % data.shape[0]
            batch = data[rows]
            loss = model(input_ids=batch, labels=batch).loss
            assert loss is not None
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        elapsed = time.perf_counter() - t0
        first = sum(losses[:3]) / min(3, len(losses))
        last = sum(losses[-3:]) / min(3, len(losses))
        print(
            f"loss {first:.4f} -> {last:.4f} over {args.steps} steps ({elapsed / args.steps:.2f}s/step)",
            flush=True,
        )
        if args.save:
            save(model, args.save)
            print(f"saved to {args.save}", flush=True)
        if args.json:
            print(json.dumps({"mode": args.mode, "steps": args.steps, "losses": losses, "seconds": elapsed}))
        return 0 if math.isfinite(last) else 1
    finally:
        model.shutdown()


def save(model: Any, path: str) -> None:
    """LoRA goes out in PEFT format; prompts as a safetensors file of the trainable tensors."""
    from safetensors.torch import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    if model.lora is not None:
        model.lora.save_pretrained(path, base_model_name_or_path=model.name_or_path)
    if model.prompts is not None:
        tensors = {k: v.detach().contiguous() for k, v in model.prompts.state_dict().items()}
        save_file(tensors, str(Path(path) / "prompts.safetensors"))
