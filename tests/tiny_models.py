"""Tiny random HF checkpoints for tests (no hub access needed).

``make_tiny_model(kind, path)`` builds a transformers model with 8 blocks, hidden size 64 and a small vocabulary,
fills every parameter deterministically from ``seed`` (norm weights near 1, biases non-zero so bias handling is
exercised), and ``save_pretrained``s it as fp32 safetensors (sharded if ``max_shard_size`` is small).
"""

from __future__ import annotations

import os
from typing import Any

import torch

NUM_BLOCKS = 8
HIDDEN = 64
VOCAB = 256

KINDS = (
    "llama-gqa-llama3rope",
    "llama-tied",
    "llama-linear-rope",
    "llama-dynamic-rope",
    "mistral",
    "qwen2",
    "bloom",
    "qwen3",
    "gemma2",
    "mixtral",
    "falcon-40b",
    "falcon-7b",
    "falcon-sequential",
)

# families added by issue 15 (one tiny checkpoint each; the swarm tests parametrize over these)
NEW_FAMILY_KINDS = ("qwen3", "gemma2", "mixtral", "falcon-40b")
# the architectures every model test covers, and extra Llama variants for RoPE scaling types
MAIN_KINDS = ("llama-gqa-llama3rope", "llama-tied", "mistral", "qwen2", "bloom", *NEW_FAMILY_KINDS)
ROPE_KINDS = ("llama-linear-rope", "llama-dynamic-rope")

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small enough that all three llama3 frequency bands occur with head_dim 16
    "original_max_position_embeddings": 64,
}


def make_config(kind: str) -> Any:
    import transformers

    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": NUM_BLOCKS,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
    }
    if kind == "llama-gqa-llama3rope":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters=dict(_LLAMA3_ROPE))
    if kind == "llama-tied":
        return transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True)
    if kind == "llama-linear-rope":
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters=rope)
    if kind == "llama-dynamic-rope":
        # short trained length so that test sequences exceed it and the NTK base actually grows
        rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
        common["max_position_embeddings"] = 16
        return transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters=rope)
    if kind == "mistral":
        # a window shorter than test sequences, so sliding-window masking is exercised
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=16)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    if kind == "bloom":
        return transformers.BloomConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=NUM_BLOCKS, n_head=4, layer_norm_epsilon=1e-5
        )
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if kind == "gemma2":
        # caps small enough that tanh soft-capping changes the tiny model's scores and logits; a window shorter
        # than test sequences on every other layer; query_pre_attn_scalar != head_dim so the scale is exercised
        return transformers.Gemma2Config(
            **common, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
            attn_logit_softcapping=4.0, final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh",
        )  # fmt: skip
    if kind == "mixtral":
        return transformers.MixtralConfig(
            **common, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2
        )
    if kind.startswith("falcon"):
        falcon: dict[str, Any] = {
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": NUM_BLOCKS, "num_attention_heads": 4,
            "ffn_hidden_size": 128, "max_position_embeddings": 256, "layer_norm_epsilon": 1e-5, "alibi": False,
        }  # fmt: skip
        if kind == "falcon-40b":  # 40B / 180B flags: grouped KV heads, separate attention and MLP norms
            flags = {
                "new_decoder_architecture": True,
                "num_kv_heads": 2,
                "parallel_attn": True,
                "bias": False,
            }
        elif kind == "falcon-7b":  # 7B flags: one shared K/V head, attention and MLP in parallel on one norm
            flags = {
                "new_decoder_architecture": False,
                "multi_query": True,
                "parallel_attn": True,
                "bias": False,
            }
        else:  # full multi-head, sequential attention then MLP, biases
            flags = {
                "new_decoder_architecture": False,
                "multi_query": False,
                "parallel_attn": False,
                "bias": True,
            }
        return transformers.FalconConfig(**falcon, **flags)
    raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(KINDS)}")


def make_tiny_hf_model(kind: str, seed: int = 0) -> Any:
    """The transformers model (fp32, eval mode) with deterministic random weights."""
    import transformers

    config = make_config(kind)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + KINDS.index(kind) * 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name or "ln_f" in name:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(0.08 * noise)
    return model.eval()


def make_tiny_model(
    kind: str, path: str | os.PathLike[str], max_shard_size: str | int = "50MB", seed: int = 0
) -> str:
    """Save a tiny random fp32 model of ``kind`` under ``path``; returns ``str(path)``.

    Use e.g. ``max_shard_size="60KB"`` to get a sharded checkpoint with ``model.safetensors.index.json``.
    """
    model = make_tiny_hf_model(kind, seed=seed)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return str(path)
