#!/usr/bin/env python
"""CUDA check of quantized blocks, for a GPU session (< 5 minutes on one GPU): prints one JSON object.

    PYTHONPATH=src python scripts/cuda_quant_check.py [--model DIR] [--quant nf4|int8] [--new-tokens 32]

Without ``--model`` it builds a random Llama with Llama-2-7B-shaped blocks (hidden 4096, intermediate 11008,
32 heads, 2 blocks, vocab 32000) in bf16 on the GPU and saves it to a temporary directory. Then it

1. loads all blocks with potluck (``load_span(..., quant=nf4)``, bf16 compute) and the client parts on CUDA,
   records GPU memory and the span's bytes per block (vs the bf16 size),
2. loads transformers' model with the matching ``BitsAndBytesConfig`` on CUDA, checks the quantized weights are
   bit-identical, and compares the prompt's logits (max |diff|),
3. generates greedily through potluck's span (KV cache) and with transformers' ``generate``; reports whether the
   tokens match (and the first mismatch), and the median decode step time of both.

Exits with status 2 and a clear message where CUDA is not available.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any


def _fail(message: str) -> None:
    print(json.dumps({"ok": False, "error": message}))
    sys.exit(2)


def make_model(path: str) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device="cuda", dtype=torch.float32)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.02 * noise)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint dir (default: a random 7B-block-shaped Llama)"
    )
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        _fail("CUDA is not available: this check needs a GPU (torch.cuda.is_available() is False)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        _fail("bitsandbytes is not installed (pip install bitsandbytes)")

    from potluck.models import LocalCausalLM, load_config
    from potluck.models.quant import module_bytes
    from potluck.server.placement import block_bytes

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="potluck-cuda-quant-") as tmp:
        path = args.model
        if path is None:
            path = tmp
            make_model(path)
        config = load_config(path)
        torch.manual_seed(0)
        prompt = torch.randint(0, int(config.vocab_size), (1, args.prompt_tokens), device="cuda")
        dtype = torch.bfloat16

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ours = LocalCausalLM.from_pretrained(path, dtype=dtype, device="cuda", quant=args.quant)
        ours.requires_grad_(False)
        span_bytes = module_bytes(ours.span)
        loaded = torch.cuda.memory_allocated() - before
        peak_load = torch.cuda.max_memory_allocated() - before

        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if args.quant == "nf4":
            bnb_config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        else:
            bnb_config = BitsAndBytesConfig(load_in_8bit=True)
        hf = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config, dtype=dtype, device_map="cuda", attn_implementation="sdpa"
        ).eval()
        same_weights = all(
            torch.equal(
                ours.span.blocks[i].get_submodule(name).weight.data,
                hf.model.layers[i].get_submodule(name).weight.data,
            )
            for i in range(ours.span.num_blocks)
            for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
        )
        with torch.inference_mode():
            ours_logits = ours(input_ids=prompt).logits.float()
            hf_logits = hf(input_ids=prompt).logits.float()
        max_diff = float((ours_logits - hf_logits).abs().max())

        # greedy decode through potluck's span with its KV cache, timing each step
        cache = ours.new_cache(1, args.prompt_tokens + args.new_tokens)
        tokens: list[int] = []
        step_times: list[float] = []
        with torch.inference_mode():
            logits = ours.step(prompt, cache)[:, -1]
            for _ in range(args.new_tokens - 1):
                next_id = logits.argmax(-1, keepdim=True)  # [1, 1]
                tokens.append(int(next_id))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits = ours.step(next_id, cache)[:, -1]
                torch.cuda.synchronize()
                step_times.append(time.perf_counter() - t0)
            tokens.append(int(logits.argmax(-1)))
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf_out = hf.generate(
                prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        torch.cuda.synchronize()
        hf_per_token = (time.perf_counter() - t0) / args.new_tokens
        hf_tokens = hf_out[0, args.prompt_tokens :].tolist()
        mismatch = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens, strict=True)) if a != b), None)

        bf16_block = block_bytes(config, torch.bfloat16, "none")
        result: dict[str, Any] = {
            "ok": bool(same_weights and mismatch is None),
            "device": torch.cuda.get_device_name(),
            "quant": args.quant,
            "blocks": ours.span.num_blocks,
            "hidden_size": int(config.hidden_size),
            "intermediate_size": int(config.intermediate_size),
            "weights_bit_identical_to_transformers": same_weights,
            "prompt_logits_max_abs_diff": round(max_diff, 6),
            "greedy_tokens_match": mismatch is None,
            "first_mismatch": mismatch,
            "span_bytes_per_block": span_bytes // ours.span.num_blocks,
            "bf16_bytes_per_block": bf16_block,
            "ratio_to_bf16": round(span_bytes / ours.span.num_blocks / bf16_block, 4),
            "estimated_bytes_per_block": block_bytes(config, dtype, args.quant),
            "gpu_memory_after_load_mib": round(loaded / 2**20, 1),  # span + client parts (embeddings, head)
            "gpu_peak_during_load_mib": round(peak_load / 2**20, 1),
            "decode_step_ms_median": round(statistics.median(step_times) * 1000, 3),
            "transformers_ms_per_token": round(hf_per_token * 1000, 3),
            "seconds_total": round(time.perf_counter() - t_start, 1),
        }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
