"""Models from folders, in one room: every Hugging Face model or tokenizer skillbank loads is read here, locally and
from safetensors only (a folder of pickled weights is refused before anything is deserialized), with the
architecture its config names; the ``pulled:`` alias prefix is spelled here; ``apply_delta`` writes weights into
a loaded model. Torch and transformers load with the function that needs them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillbank.errors import SkillbankError, TaskVectorError

if TYPE_CHECKING:  # the room imports nothing heavy: --help and the pulled: prefix read it without torch
    from torch import Tensor, nn

__all__ = [
    "PULLED",
    "apply_delta",
    "is_causal_lm_config",
    "load_base_model",
    "load_classifier",
    "load_encoder",
    "load_model",
    "load_tokenizer",
    "model_path",
    "require_safetensors",
]

#: The prefix of a pulled model's alias (``pulled:minilm``); only the edges resolve one (``skillbank.integrations.pulled.wheels``).
PULLED = "pulled:"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def model_path(source: str | Path) -> Path:
    """``source`` as a path; a pulled model's alias (``pulled:minilm``) is refused with what to do.

    Aliases are resolved at the edges — the CLI, configs run by ``skillbank fit`` and the
    DataModules' ``prepare_data`` — so nothing in the core downloads, on any rank.
    """
    if str(source).startswith(PULLED):
        raise SkillbankError(
            f"{str(source)!r} is a pulled model's alias, which only the command line, configs and DataModules "
            f"resolve; in Python pass its folder: skillbank.integrations.pulled.wheels.resolve_model({str(source)!r}) (it pulls on first use)."
        )
    return Path(source)


def require_safetensors(folder: str | Path, stem: str = "model") -> Path:
    """``folder`` if it holds ``<stem>.safetensors`` (or its shard index), else a :class:`SkillbankError`.

    Checked before any Hugging Face loader sees the folder, so a folder with only
    pickled weights is refused before anything is deserialized.
    """
    folder = Path(folder)
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return folder
    if not folder.exists():
        hint = (
            " It is one of the demo's folders: make them first with `skillbank demo` (it writes them to ./skillbank-demo)."
            if "skillbank-demo" in folder.parts
            else ""
        )
        raise SkillbankError(f"no model folder at {folder} (relative to {Path.cwd()}): the path does not exist.{hint}")
    found = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
    pickled = [n for n in found if n.endswith(_PICKLE_SUFFIXES)]
    why = (
        f"it holds only pickled weights ({', '.join(pickled)}), and skillbank never unpickles (unpickling runs arbitrary code)"
        if pickled
        else f"found: {found}"
    )
    raise SkillbankError(
        f"{folder} has no {stem}.safetensors: {why}. Re-save it with "
        "save_pretrained(folder, safe_serialization=True) from a trusted copy."
    )


def is_causal_lm_config(config: Mapping[str, Any]) -> bool:
    """Whether a model folder's ``config.json`` (as a mapping) names a causal LM architecture."""
    return any(str(a).endswith(_CAUSAL_SUFFIXES) for a in config.get("architectures") or ())


def load_model(model: nn.Module | str, num_labels: int | None = None) -> nn.Module:
    """``model`` itself, or a model loaded from a local Hugging Face folder: a causal
    language model when its config names a ``…ForCausalLM``/``…LMHeadModel`` architecture, else a sequence classifier."""
    import json

    from torch import nn

    if isinstance(model, nn.Module):
        return model

    from transformers import AutoModelForCausalLM

    folder = require_safetensors(model_path(model))
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() and config_file.stat().st_size < 1 << 20 else {}
    if is_causal_lm_config(config):
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return load_classifier(folder, num_labels)


def load_classifier(folder: str | Path, num_labels: int | None = None) -> nn.Module:
    """A sequence classifier from a local Hugging Face folder: the folder's own head, or a new one of ``num_labels``."""
    from transformers import AutoModelForSequenceClassification

    extra: dict[str, Any] = {} if num_labels is None else {"num_labels": num_labels}
    return AutoModelForSequenceClassification.from_pretrained(
        require_safetensors(model_path(folder)), local_files_only=True, use_safetensors=True, **extra
    )


def load_base_model(base: str | Path) -> nn.Module:
    """Load a ``save_pretrained`` folder with the architecture its config names (``AutoModel`` otherwise)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(require_safetensors(base), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return (cls or transformers.AutoModel).from_pretrained(base, local_files_only=True, use_safetensors=True).eval()


def load_encoder(base: str | Path) -> Any:  # a transformers model
    """The base model folder as a Hugging Face encoder (its features route requests), in eval mode."""
    from transformers import AutoModel

    if not (Path(base) / "config.json").is_file():
        raise SkillbankError(f"the base must be a Hugging Face model folder (with config.json), not {base}.")
    return AutoModel.from_pretrained(require_safetensors(base), local_files_only=True, use_safetensors=True).eval()


def load_tokenizer(*folders: str | Path) -> Any:  # a Hugging Face tokenizer
    """The tokenizer of the first folder that has one."""
    from transformers import AutoTokenizer

    for folder in folders:
        if not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
            continue  # transformers 5 would build an empty tokenizer that maps every word to [UNK]
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise SkillbankError(
        f"none of {', '.join(map(str, folders))} holds a tokenizer; save one with the model (tokenizer.save_pretrained(folder))."
    )


def apply_delta(model: nn.Module, base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> nn.Module:
    """Set ``model``'s parameters named in ``base`` to ``base + delta`` (``delta`` may lack entries: base kept).

    Names are matched up to a wrapper prefix (``bert.``), as everywhere in skillbank. Only floating-point
    tensors count, as in a task vector: a checkpoint's integer buffers (``embeddings.position_ids``, which
    transformers 5 no longer keeps in the model) are neither written nor required.

    Raises:
        TaskVectorError: a floating-point base or delta tensor has no counterpart in ``model`` or another shape.
    """
    from skillbank.vectors.weights import align_names  # weights reads folders through this module

    base = {k: v for k, v in base.items() if v.is_floating_point()}
    params = dict(model.state_dict(keep_vars=True))
    names = align_names(base, params)
    missing = sorted(set(base) - set(names)) + sorted(set(delta) - set(base))
    if missing:
        raise TaskVectorError(f"the model has no tensor for {missing[:5]}; is it built on this base?")
    import torch

    with torch.no_grad():
        for src, dst in names.items():
            value = base[src].float() + delta[src].to(base[src].device).float() if src in delta else base[src]
            if params[dst].shape != value.shape:
                raise TaskVectorError(f"{dst!r} has shape {tuple(params[dst].shape)}, the base {tuple(value.shape)}.")
            params[dst].copy_(value)
    return model
