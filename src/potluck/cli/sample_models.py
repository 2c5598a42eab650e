"""Small random checkpoints made deterministically on first use (there is no model hub here).

The demo model has a byte-level tokenizer so the demo can stream text; the bench model is the fixed workload
that benchmark results are compared on over time. Both are cached under ``$POTLUCK_CACHE`` (default
``~/.cache/potluck``) and rebuilt only when their recipe version changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

from potluck.paths import cache_root

logger = logging.getLogger(__name__)

DEMO_RECIPE = "demo-llama-v1"
BENCH_RECIPE = "bench-llama-1024-v1"


def _byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _build(
    path: Path, config_kwargs: dict[str, Any], *, seed: int, tokenizer: Any = None, shard: str = "200MB"
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # a directory of this builder's own: two processes building the same recipe at once (two demos, parallel
    # test workers) must not write into each other's files; the first rename wins, the other result is dropped
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.partial-", dir=path.parent))
    torch.manual_seed(seed)
    config = LlamaConfig(**config_kwargs)
    model = LlamaForCausalLM(config).eval()
    if tokenizer is not None:
        # Favour printable characters so the demo's random model streams readable (if meaningless) text.
        printable = set(string.ascii_letters + string.digits + " .,")
        with torch.no_grad():
            for token, index in tokenizer.get_vocab().items():
                text = tokenizer.convert_tokens_to_string([token])
                if text not in printable:
                    model.lm_head.weight[index].mul_(0.05)
        tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp, max_shard_size=shard)
    (tmp / "potluck_recipe.json").write_text(json.dumps({"recipe": path.name, "seed": seed}))
    try:
        tmp.rename(path)  # atomic; fails where the directory exists
    except OSError:
        if (path / "potluck_recipe.json").is_file():  # another builder finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(path, ignore_errors=True)  # an unfinished directory (an older version's)
        tmp.rename(path)


def demo_model_path() -> str:
    """A small Llama (8 blocks, GQA) with a byte-level tokenizer."""
    path = cache_root() / DEMO_RECIPE
    if not (path / "potluck_recipe.json").exists():
        logger.info("making the demo model at %s (first run only)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok = _byte_tokenizer()
        _build(
            path,
            dict(
                vocab_size=len(tok),
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False,
            ),
            seed=1234,
            tokenizer=tok,
            shard="2MB",
        )
    return str(path)


def bench_model_path() -> str:
    """The standard bench workload: Llama, hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000."""
    path = cache_root() / BENCH_RECIPE
    if not (path / "potluck_recipe.json").exists():
        logger.info("making the bench model at %s (first run only)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _build(
            path,
            dict(
                vocab_size=32000,
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=8,
                num_attention_heads=16,
                num_key_value_heads=16,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            ),
            seed=0,
        )
    return str(path)
