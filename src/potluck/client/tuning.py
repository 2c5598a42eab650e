"""Client-owned trainable parameters: soft prompts (ptune / deep_ptune) and LoRA adapters for remote blocks.

Servers keep their weights frozen; these parameters live on the client, travel with each request (sliced to
the hop's blocks) and get their gradients back through ``backward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from potluck.models import LoraConfig, LoraWeights, family_by_name, load_peft_adapter, save_peft_adapter
from potluck.models.spec import ModelSpec
from potluck.swarm.routing import RouteHop
from potluck.wire import LoraInfo, Tuning

TUNING_MODES = (None, "ptune", "deep_ptune")
# trained soft prompts in a directory (as `potluck finetune --save` writes)
PROMPTS_FILE = "prompts.safetensors"


class PromptTuning(nn.Module):
    """``pre_seq_len`` soft tokens before the input; with ``deep``, also a prompt added before every block."""

    def __init__(self, spec: ModelSpec, pre_seq_len: int, deep: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError("pre_seq_len must be at least 1 for prompt tuning")
        self.pre_seq_len = pre_seq_len
        self.prompt_embeddings = nn.Parameter(torch.randn(pre_seq_len, spec.hidden_size, dtype=dtype) * 0.02)
        # Deep prompts start at zero: the untrained model is exactly the base model plus the shallow prompt.
        self.intermediate_prompts = (
            nn.Parameter(torch.zeros(spec.num_blocks, pre_seq_len, spec.hidden_size, dtype=dtype))
            if deep
            else None
        )

    def prefix(self, batch: int) -> torch.Tensor:
        return self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)  # [B, P, H]

    def deep_prompts(self) -> torch.Tensor | None:
        if self.intermediate_prompts is None:
            return None
        return self.intermediate_prompts.unsqueeze(1)  # [n_blocks, 1, P, H], broadcast over the batch

    def save_pretrained(self, path: str) -> None:
        """Write the prompts to ``path/prompts.safetensors`` (the format ``potluck finetune --save`` uses)."""
        Path(path).mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(path) / PROMPTS_FILE))

    def load_pretrained(self, path: str) -> None:
        """Load prompts saved by ``save_pretrained`` or ``potluck finetune --save`` (a directory or the file)."""
        file = Path(path) / PROMPTS_FILE if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"no saved soft prompt at {file}")
        loaded = load_file(str(file))
        mine = self.state_dict()
        if set(loaded) != set(mine):
            raise ValueError(
                f"{file} holds {sorted(loaded)}, this model's prompts are {sorted(mine)} "
                "(ptune saves prompt_embeddings; deep_ptune also intermediate_prompts): use the same tuning_mode"
            )
        for name, tensor in loaded.items():
            if tensor.shape != mine[name].shape:
                raise ValueError(
                    f"{file}: {name} is {list(tensor.shape)}, this model expects {list(mine[name].shape)} "
                    "(pass the pre_seq_len it was trained with)"
                )
        with torch.no_grad():
            for name, tensor in loaded.items():
                mine[name].copy_(tensor)


class RemoteLora(nn.Module):
    """LoRA adapters for every remote block, owned and trained by the client."""

    def __init__(self, spec: ModelSpec, config: LoraConfig, family: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        config.validate(family)
        self.config = config
        self.spec = spec
        init = LoraWeights.init(spec, config, 0, spec.num_blocks, dtype=dtype, device=torch.device("cpu"))
        self.a = nn.ParameterDict({t: nn.Parameter(init.a[t].clone()) for t in config.targets})
        self.b = nn.ParameterDict({t: nn.Parameter(init.b[t].clone()) for t in config.targets})

    def weights(self) -> LoraWeights:
        """The current adapters as LoraWeights over all blocks (autograd flows back to the parameters)."""
        return LoraWeights(
            self.config, 0, self.spec.num_blocks, {t: self.a[t] for t in self.config.targets},
            {t: self.b[t] for t in self.config.targets},
        )  # fmt: skip

    def save_pretrained(self, path: str, base_model_name_or_path: str | None = None) -> None:
        """Write the adapters in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        with torch.no_grad():
            save_peft_adapter(
                path, self.weights(), self.spec, base_model_name_or_path=base_model_name_or_path
            )

    def load_pretrained(self, path: str) -> None:
        loaded = load_peft_adapter(
            path, self.spec, dtype=self.a[self.config.targets[0]].dtype, device=torch.device("cpu")
        )
        if loaded.config.targets != self.config.targets or loaded.config.rank != self.config.rank:
            raise ValueError(
                f"adapter at {path} has {loaded.config}, this model was set up with {self.config}"
            )
        with torch.no_grad():
            for t in self.config.targets:
                self.a[t].copy_(loaded.a[t])
                self.b[t].copy_(loaded.b[t])


@dataclass
class TuningPayload:
    """What one forward/backward/inference request carries beyond hidden states, for the whole model."""

    prompts: torch.Tensor | None = None  # [n_blocks, 1, P, H]: shared by every row of the batch
    lora: LoraWeights | None = None  # over all blocks
    active_adapter: str | None = None  # a server-preloaded adapter

    @property
    def empty(self) -> bool:
        return self.prompts is None and self.lora is None and self.active_adapter is None

    def for_hop(self, hop: RouteHop) -> tuple[Tuning, list[torch.Tensor]]:
        """The ``Tuning`` header and tensors for blocks [hop.start, hop.end)."""
        tensors: list[torch.Tensor] = []
        if self.prompts is not None:
            tensors.append(self.prompts[hop.start : hop.end].detach())
        info = None
        if self.lora is not None:
            part = self.lora.slice(hop.start, hop.end)
            tensors.extend(t.detach() for t in part.tensors())
            cfg = self.lora.config
            info = LoraInfo(rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets))
        return Tuning(
            has_prompts=self.prompts is not None, lora=info, active_adapter=self.active_adapter
        ), tensors

    def trainable(self) -> list[torch.Tensor]:
        """Full-model tensors whose gradients backward returns, in wire order."""
        out = [] if self.prompts is None else [self.prompts]
        if self.lora is not None:
            out.extend(self.lora.tensors())
        return out

    def accumulate(self, grads: list[torch.Tensor], hop: RouteHop, hop_grads: list[torch.Tensor]) -> None:
        """Add a hop's gradients (wire order, sliced to its blocks) into full-model ``grads``."""
        for full, part in zip(grads, hop_grads, strict=True):
            full[hop.start : hop.end] += part.to(full.dtype)


def default_lora_targets(family: str) -> tuple[str, ...]:
    return family_by_name(family).default_lora_targets
