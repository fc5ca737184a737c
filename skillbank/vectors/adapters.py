"""PEFT (LoRA) finetunes as skillbank inputs: merged with PEFT's own ``merge_and_unload`` on a copy.

A finetune may be a PEFT adapter folder (``adapter_config.json``), a ``PeftModel``
in memory, or a module that holds one (a LightningModule). :func:`merged_finetune`
turns any of these into a plain model whose weights are ``θ_pre + ΔW_LoRA`` and
whose ``modules_to_save`` (e.g. the classifier) carry their trained values;
the original model is never changed. Anything else passes through untouched.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from skillbank.errors import BaseMismatchError, SkillbankError

__all__ = ["Finetune", "find_peft_model", "is_adapter_folder", "merged_finetune"]


class Finetune:
    """A finetune ready for a task vector: ``weights`` (a module or the input itself), ``source`` (empty for a
    plain finetune; the adapter's kind and config for a merged one) and ``head_patterns`` (its ``modules_to_save``)."""

    def __init__(self, weights: Any, source: dict[str, Any], head_patterns: tuple[str, ...] = ()) -> None:
        self.weights, self.source, self.head_patterns = weights, source, head_patterns


def is_adapter_folder(path: object) -> bool:
    """Whether ``path`` is a folder written by PEFT's ``save_pretrained`` (it holds ``adapter_config.json``)."""
    return isinstance(path, (str, Path)) and (Path(path) / "adapter_config.json").is_file()


def find_peft_model(module: object) -> nn.Module | None:
    """``module`` if it is a ``PeftModel``, else the first ``PeftModel`` among its submodules (e.g. a LightningModule's)."""
    from peft import PeftModel

    if isinstance(module, PeftModel):
        return module
    if isinstance(module, nn.Module):
        return next((m for m in module.modules() if isinstance(m, PeftModel)), None)
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(_json_safe(v) for v in value) if isinstance(value, (set, frozenset)) else [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _head_patterns(modules_to_save: list[str] | None) -> tuple[str, ...]:
    return tuple(rf"(^|\.){re.escape(m)}\." for m in (modules_to_save or []))


def _merge(peft_model: Any, origin: str, *, own: bool = False) -> Finetune:  # a peft.PeftModel
    """Merge ``peft_model``: on a copy, unless ``own`` (a model built here, nobody else holds it)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    peft_type = getattr(config, "peft_type", "LORA")
    if getattr(peft_type, "value", peft_type) != "LORA":
        raise SkillbankError(f"{origin}: only LoRA adapters can be merged into a task vector, got {config.peft_type}.")
    merged = (
        peft_model if own else copy.deepcopy(peft_model)
    ).merge_and_unload()  # PEFT's own merge; the caller's model is untouched
    saved = sorted(set(getattr(config, "modules_to_save", None) or []))
    source = {"kind": "lora adapter", "origin": origin, "adapter_config": _json_safe(config.to_dict()), "modules_to_save": saved}
    return Finetune(merged.eval(), source, _head_patterns(saved))


def _labels_in_adapter(folder: Path) -> int | None:
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as fh:
        for key in fh.keys():
            if re.search(r"(classifier|score)(\.modules_to_save\.\w+)?(\.out_proj)?\.weight$", key):
                return int(fh.get_slice(key).get_shape()[0])
    return None


def _base_for_adapter(base: Any, folder: Path, config: dict[str, Any]) -> nn.Module:
    """A fresh model of the adapter's kind holding the base weights (never the caller's module)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from skillbank.vectors.models import load_classifier, load_encoder, model_path
    from skillbank.vectors.weights import align_names, load_weights

    seq_cls = config.get("task_type") == "SEQ_CLS"
    labels = _labels_in_adapter(folder) if seq_cls else None
    extra: dict[str, Any] = {"num_labels": labels} if labels else {}
    auto = AutoModelForSequenceClassification if seq_cls else AutoModel
    base = model_path(base) if isinstance(base, str) else base
    if isinstance(base, (str, Path)) and Path(base).is_dir():
        return load_classifier(base, labels) if seq_cls else load_encoder(base)
    if isinstance(base, nn.Module) and hasattr(base, "config"):
        model = auto.from_config(copy.deepcopy(base.config), **extra)
        state = load_weights(base)
        target = dict(model.state_dict(keep_vars=True))
        for src, dst in align_names(state, target).items():
            if target[dst].shape == state[src].shape:
                target[dst].data.copy_(state[src])
        return model
    raise SkillbankError(
        f"to merge the adapter in {folder}, the base must be a Hugging Face model folder, a pulled model "
        "(pulled:minilm) or a transformers model in memory; weights alone do not say which architecture to build."
    )


def _load_adapter(folder: Path, base: Any) -> Finetune:
    from peft import PeftModel

    from skillbank.vectors.models import require_safetensors

    require_safetensors(folder, stem="adapter_model")  # PEFT would fall back to a pickled adapter_model.bin
    config = json.loads((folder / "adapter_config.json").read_text())
    model = _base_for_adapter(base, folder, config)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise BaseMismatchError(
            f"the PEFT adapter in {folder} does not fit this base (it was trained on "
            f"{config.get('base_model_name_or_path') or 'an unrecorded base'}): {str(exc).splitlines()[0][:300]} "
            "Pass the base model the adapter was trained from."
        ) from exc
    finetune = _merge(peft_model, str(folder), own=True)
    finetune.source["adapter_folder"] = str(folder)
    return finetune


def merged_finetune(finetuned: Any, base: Any = None) -> Finetune:
    """Turn an adapter folder, a ``PeftModel`` or a module holding one into merged weights; pass anything else through.

    Args:
        finetuned: the finetune, in any form skillbank accepts.
        base: the base the adapter was trained from; needed only for an adapter folder.

    Raises:
        BaseMismatchError: the adapter's layers do not fit ``base``.
    """
    if is_adapter_folder(finetuned):
        if base is None:
            raise SkillbankError(f"{finetuned} is a PEFT adapter: give the base it was trained from to merge it.")
        return _load_adapter(Path(finetuned), base)
    peft_model = find_peft_model(finetuned)
    if peft_model is not None:
        return _merge(peft_model, type(finetuned).__name__)
    if isinstance(finetuned, Finetune):
        return finetuned
    return Finetune(finetuned, {})
