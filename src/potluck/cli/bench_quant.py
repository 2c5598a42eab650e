"""``potluck bench inference --quant int8|nf4``: a quantized swarm beside an unquantized one, in the same run.

One loopback swarm holds two sets of servers over the same checkpoint and compute dtype (``--dtype``, bf16 by
default): one with ``--quant Q``, one unquantized. Clients pick a set with ``allowed_quant``. For each set the
bench reports the bytes per block the servers announce, the decode step time, and the mean KL divergence
``KL(p_fp32 || p_set)`` of the next-token distributions over the bench prompt against the fp32 model in-process.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from potluck.cli.local_swarm import link_swarm


def _mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)); both ``[1, T, V]``."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)  # [1, T, V]
    got = F.log_softmax(logits.float(), dim=-1)  # [1, T, V]
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def bench_inference_quant(args: argparse.Namespace) -> dict[str, Any]:
    from potluck import AutoDistributedModelForCausalLM
    from potluck.cli.bench import _decode_loop, _even_spans, _ms
    from potluck.cli.sample_models import bench_model_path
    from potluck.cli.status import read_status
    from potluck.models import LocalCausalLM, load_config
    from potluck.server.placement import block_bytes
    from potluck.swarm import aio
    from potluck.swarm.records import model_prefix_for

    model_path = args.model or bench_model_path()
    config = load_config(model_path)
    num_blocks = int(config.num_hidden_layers)
    spans = _even_spans(num_blocks, args.servers)
    torch.manual_seed(0)
    prompt = torch.randint(0, int(config.vocab_size), (1, args.prompt_tokens))
    max_length = args.prompt_tokens + args.new_tokens
    dtype = getattr(torch, args.dtype)
    local = LocalCausalLM.from_pretrained(model_path)  # the fp32 reference
    with torch.inference_mode():
        reference = local(input_ids=prompt).logits  # [1, T, V]
    del local
    sets = (args.quant, "none")
    results: dict[str, dict[str, Any]] = {}
    with link_swarm(args.link_delay_ms, args.link_mbps) as swarm:
        swarm.start_bootstrap()
        extra = ["--throughput", "100", "--dtype", args.dtype]
        procs = {
            q: [
                swarm.start_server(model_path, s, wait=False, extra_args=[*extra, "--quant", q])
                for s in spans
            ]
            for q in sets
        }
        swarm.wait_ready([p for ps in procs.values() for p in ps])
        snapshot, _ = aio.run(
            read_status(tuple(swarm.initial_peers), model_prefix_for(model_path), num_blocks)
        )
        for q in sets:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                model_path, initial_peers=swarm.initial_peers, load_tokenizer=False, allowed_quant=(q,),
                compression=args.compression, link_delay_ms=args.link_delay_ms, link_mbps=args.link_mbps,
            )  # fmt: skip
            try:
                with torch.inference_mode():
                    logits = model(input_ids=prompt).logits  # [1, T, V]
                    with model.inference_session(max_length=max_length) as session:
                        parts = model.client
                        prefill, steps = _decode_loop(
                            lambda h, s=session, p=parts: s.step(p.pre_blocks(h)),
                            (parts.embed, parts.head),
                            prompt,
                            args.new_tokens,
                        )
                        route = [f"{h.peer_id[-8:]}[{h.hop.start}:{h.hop.end}]" for h in session.remote.hops]
            finally:
                model.shutdown()
            announced = {snapshot.servers[p.peer_id].record.block_bytes for p in procs[q]}  # type: ignore[index]
            results[q] = {
                "route": route,
                "block_bytes_announced": sorted(announced),
                "prefill_ms": _ms(prefill),
                "swarm_step_ms": _ms(statistics.median(steps)),
                "swarm_step_mean_ms": _ms(statistics.mean(steps)),
                "mean_kl_vs_fp32": round(_mean_kl(reference, logits), 6),
                "argmax_agreement_vs_fp32": round(
                    float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4
                ),
            }
    estimates = {q: block_bytes(config, dtype, q) for q in ("none", "int8", "nf4")}
    bf16 = block_bytes(config, torch.bfloat16, "none")
    return {
        "bench": "inference-quant",
        "model": model_path,
        "quant": args.quant,
        "dtype": args.dtype,
        "servers_per_set": len(spans),
        "spans": [list(s) for s in spans],
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "block_bytes": estimates,  # per block at --dtype compute dtype, for each quantization
        "block_bytes_ratio_to_bf16": {q: round(b / bf16, 4) for q, b in estimates.items()},
        "quantized": results[args.quant],
        "unquantized": results["none"],
        "step_ratio_quantized_to_unquantized": round(
            results[args.quant]["swarm_step_ms"] / results["none"]["swarm_step_ms"], 3
        ),
        "torch_threads": torch.get_num_threads(),
    }
