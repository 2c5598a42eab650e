"""A character-level tokenizer with a chat template for the tiny test models (built with `tokenizers`).

Every id of the tiny vocabulary maps to a distinct character (ids 0-2 are <unk>, <s>, </s>), so text equality
means token equality and any token a random model picks decodes to something visible.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ("<unk>", "<s>", "</s>")


def _alphabet(size: int) -> list[str]:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII first: prompts are plain text
    code = 0xA1
    while len(chars) < size:
        if chr(code).isprintable() and chr(code) not in chars:
            chars.append(chr(code))
        code += 1
    return chars[:size]


def make_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in _alphabet(vocab_size - len(SPECIALS)):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def checkpoint_with_tokenizer(model_dir: str, out_dir: str | os.PathLike[str]) -> str:
    """A copy of a tiny checkpoint with the tokenizer (and its chat template) saved beside it."""
    from transformers import AutoConfig

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    make_tokenizer(int(AutoConfig.from_pretrained(model_dir).vocab_size)).save_pretrained(str(out_dir))
    return str(out_dir)
