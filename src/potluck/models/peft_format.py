"""PEFT's on-disk LoRA format: ``adapter_config.json`` + ``adapter_model.safetensors``, read and written.

Split from ``lora.py`` (the maths) so that each stays small; tensor names match what PEFT itself writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from potluck.models.lora import LoraConfig, LoraWeights, _family, _valid_targets, target_experts
from potluck.models.spec import ModelSpec

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_TORCH_WEIGHTS_NAME = "adapter_model.bin"
_PEFT_KEY_PREFIX = "base_model.model."


class PeftFormatError(ValueError):
    """A PEFT adapter directory is missing files, uses unsupported options, or does not fit the model."""


# ---------------------------------------------------------------------------------------------------------------
# PEFT format

# adapter_config.json options whose non-default values change what the adapter computes (or where it applies)
# beyond what LoraWeights can express.
_UNSUPPORTED_IF_SET = (
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
    "fan_in_fan_out",
    "lora_bias",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)
# init methods that also modify the base weights (the adapter only works on top of the modified model)
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _block_prefix_pattern(spec: ModelSpec) -> tuple[str, str]:
    """``(block prefix template, base-model prefix)`` of the checkpoint names, e.g. ("model.layers.{i}.", "model.")."""
    family = _family(spec.family)
    return family.block_prefix_template, family.base_prefix


def _module_paths(spec: ModelSpec) -> dict[str, str]:
    """target -> module path inside a block, for the targets the PEFT file format covers here."""
    targets = _family(spec.family).lora_targets
    return {name: t.path for name, t in targets.items() if t.experts is None}


def _peft_key(spec: ModelSpec, block: int, target: str, which: str) -> str:
    template, _ = _block_prefix_pattern(spec)
    path = _module_paths(spec)[target]
    return f"{_PEFT_KEY_PREFIX}{template.format(i=block)}{path}.lora_{which}.weight"


def save_peft_adapter(
    path: str | os.PathLike[str],
    lora: LoraWeights,
    spec: ModelSpec,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``lora`` (covering all blocks of ``spec``) as a PEFT LoRA adapter directory.

    Creates ``adapter_config.json`` and ``adapter_model.safetensors`` with the key names PEFT itself writes, so
    ``peft.PeftModel.from_pretrained(hf_model, path)`` loads it.
    """
    from safetensors.torch import save_file

    if (lora.start, lora.end) != (0, spec.num_blocks):
        raise ValueError(
            f"a PEFT adapter must cover all {spec.num_blocks} blocks, LoRA covers [{lora.start}, {lora.end})"
        )
    lora.check_spec(spec)
    config = lora.config
    experts = [t for t in config.targets if target_experts(spec, t)]
    if experts:
        # PEFT stores adapters of stacked experts (target_parameters) nested under each other; not written yet.
        raise PeftFormatError(
            f"LoRA on stacked experts ({', '.join(experts)}) cannot be saved in PEFT format yet"
        )
    tensors: dict[str, torch.Tensor] = {}
    for target in config.targets:
        a, b = lora.a[target].detach().cpu(), lora.b[target].detach().cpu()
        for i in range(lora.num_blocks):
            tensors[_peft_key(spec, i, target, "A")] = a[i].contiguous()  # [r, in]
            tensors[_peft_key(spec, i, target, "B")] = b[i].contiguous()  # [out, r]
    alpha: float | int = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    adapter_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": config.rank,
        "lora_alpha": alpha,
        "target_modules": list(config.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, PEFT_CONFIG_NAME), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def _is_set(value: Any) -> bool:
    return value not in (None, False, {}, [], "", 0)


def _check_peft_config(cfg: Mapping[str, Any], where: str) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise PeftFormatError(f"{where}: peft_type {peft_type!r} is not supported (only 'LORA')")
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM", "FEATURE_EXTRACTION"):
        raise PeftFormatError(f"{where}: task_type {task_type!r} is not supported (expected 'CAUSAL_LM')")
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise PeftFormatError(f"{where}: bias={bias!r} is not supported (only 'none')")
    unsupported = {key: cfg[key] for key in _UNSUPPORTED_IF_SET if _is_set(cfg.get(key))}
    if unsupported:
        desc = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
        raise PeftFormatError(f"{where}: unsupported LoRA option(s): {desc}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise PeftFormatError(
            f"{where}: init_lora_weights={init!r} modifies the base weights; convert the adapter to plain LoRA "
            "(PEFT's path_initial_model_for_weight_conversion) first"
        )
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise PeftFormatError(f"{where}: r must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise PeftFormatError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    target_modules = cfg.get("target_modules")
    if not isinstance(target_modules, str) and not (
        isinstance(target_modules, list)
        and target_modules
        and all(isinstance(t, str) for t in target_modules)
    ):
        raise PeftFormatError(
            f"{where}: target_modules must be a module name list or a regex string, got {target_modules!r}"
        )


def load_peft_adapter(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LoraWeights:
    """Read a PEFT LoRA adapter directory (written by PEFT or :func:`save_peft_adapter`) for a model of ``spec``.

    The targets are taken from the tensors in ``adapter_model.safetensors`` (which also handles a regex-string
    ``target_modules``); every target must be adapted in every block. Options LoraWeights cannot express are
    rejected with :class:`PeftFormatError`.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config_path = os.path.join(path, PEFT_CONFIG_NAME)
    weights_path = os.path.join(path, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise PeftFormatError(f"{path}: {PEFT_CONFIG_NAME} not found (not a PEFT adapter directory)")
    if not os.path.isfile(weights_path):
        found_bin = os.path.isfile(os.path.join(path, _PEFT_TORCH_WEIGHTS_NAME))
        raise PeftFormatError(
            f"{path}: {PEFT_WEIGHTS_NAME} not found"
            + (
                f" (found {_PEFT_TORCH_WEIGHTS_NAME}; only safetensors adapters are supported)"
                if found_bin
                else ""
            )
        )
    with open(config_path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise PeftFormatError(f"{config_path}: expected a JSON object")
    _check_peft_config(cfg, config_path)
    valid_targets = _valid_targets(spec.family)

    template, base_prefix = _block_prefix_pattern(spec)
    layers_re = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
    # the base-model prefix is optional: adapters trained on the bare base model (e.g. LlamaModel) lack it
    if template.startswith(base_prefix):
        layers_re = f"(?:{re.escape(base_prefix)})?{layers_re[len(re.escape(base_prefix)) :]}"
    path_to_target = {p: t for t, p in _module_paths(spec).items()}
    paths_re = "|".join(re.escape(p) for p in path_to_target)
    key_re = re.compile(
        rf"(?:{re.escape(_PEFT_KEY_PREFIX)})?{layers_re}({paths_re})\.lora_([AB])(?:\.default)?\.weight"
    )

    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # target -> "A"/"B" -> block -> tensor
    unknown: list[str] = []
    with safe_open(weights_path, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            match = key_re.fullmatch(key)
            if match is None:
                unknown.append(key)
                continue
            block, target, which = int(match.group(1)), path_to_target[match.group(2)], match.group(3)
            if block >= spec.num_blocks:
                raise PeftFormatError(
                    f"{weights_path}: {key} is for block {block}, model has {spec.num_blocks}"
                )
            found.setdefault(target, {}).setdefault(which, {})[block] = f.get_tensor(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise PeftFormatError(
            f"{weights_path}: tensors not on a supported LoRA target of a {spec.family} block "
            f"({', '.join(valid_targets)}): {shown}"
        )
    if not found:
        raise PeftFormatError(f"{weights_path}: no LoRA tensors found")

    targets = tuple(t for t in valid_targets if t in found)
    config = LoraConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], targets=targets)
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for target in targets:
        per_block = found[target]
        for which in ("A", "B"):
            missing = [i for i in range(spec.num_blocks) if i not in per_block.get(which, {})]
            if missing:
                raise PeftFormatError(
                    f"{weights_path}: lora_{which} of {target!r} is missing for blocks {missing}; "
                    "adapters must cover every block"
                )
        for which, out in (("A", a), ("B", b)):
            mats = [per_block[which][i] for i in range(spec.num_blocks)]
            shapes = {tuple(m.shape) for m in mats}
            if len(shapes) != 1 or mats[0].dim() != 2:
                raise PeftFormatError(
                    f"{weights_path}: lora_{which} of {target!r} must be one 2-d shape in every block "
                    f"(rank_pattern is not supported), got shapes {sorted(shapes)}"
                )
            out[target] = torch.stack(mats).to(dtype=dtype, device=device)  # [n, r, in] / [n, out, r]
    try:
        return LoraWeights.from_tensors(
            config, 0, spec.num_blocks, [x for t in targets for x in (a[t], b[t])], spec=spec
        )
    except ValueError as e:
        raise PeftFormatError(f"{path}: adapter does not fit the model: {e}") from e
