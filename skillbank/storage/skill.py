"""A ``Skill``: one task's sparse region of the base model, its dense head, and metadata.

On disk a skill is one safetensors file: per shared parameter with a non-empty
region, its sorted flat indices (compact code, see :mod:`skillbank.sparse`) and
the task-vector values there; the head tensors; optionally its routing
centroids (``route/centroids``, see :mod:`skillbank.stitching.routing`); optionally a few
labelled examples (``examples/``, see :mod:`skillbank.storage.examples`); optionally
low-rank parts of weight matrices (``lowrank/``, see :mod:`skillbank.storage.low_rank`); and a JSON
metadata header. Nothing is ever unpickled. A file is written at the oldest format
version that holds what it holds (1 without examples or low-rank parts, 2 with them, 3 with values coded in a
few bits: :mod:`skillbank.storage.value_codes`, positions then in :mod:`skillbank.storage.position_codes`), so
older releases still read every skill they can.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from skillbank.errors import SkillFileError
from skillbank.sparse import decode_indices, encode_indices
from skillbank.storage.examples import Examples
from skillbank.storage.format import FORMAT_VERSION, VALUE_CODE_BITS, VALUE_DTYPE_NAMES, VALUE_FORMATS
from skillbank.storage.low_rank import LowRank, low_rank_from_tensors, low_rank_tensors
from skillbank.storage.position_codes import decode_positions, encode_positions
from skillbank.storage.value_codes import decode_values, encode_values

__all__ = ["CENTROIDS_KEY", "FORMAT_VERSION", "MAX_CENTROIDS", "Region", "Skill", "SkillMetadata", "VALUE_DTYPES"]

_HEADER_KEY = "skillbank"
#: Value dtypes a skill may store its task-vector entries in.
VALUE_DTYPES = {name: getattr(torch, name) for name in VALUE_DTYPE_NAMES}
#: The most routing centroids one skill may carry, and the widest feature they may have (reads stay bounded).
MAX_CENTROIDS, MAX_FEATURE_DIM = 256, 65536
#: The skill file's tensor holding the routing centroids.
CENTROIDS_KEY = "route/centroids"


@dataclass
class Region:
    """A skill's entries in one parameter: ascending flat ``indices`` and τ ``values`` there."""

    indices: Tensor
    values: Tensor

    def __post_init__(self) -> None:
        if self.indices.is_floating_point() or self.indices.is_complex() or self.indices.dtype == torch.bool:
            raise SkillFileError(
                f"a region's indices must be an integer tensor (torch.long), not {self.indices.dtype}: "
                "float positions would be truncated silently."
            )

    def __len__(self) -> int:
        return self.indices.numel()


@dataclass
class SkillMetadata:
    """What a skill is and how it was made; round-trips through JSON.

    ``shapes`` lists every shared parameter (base names) the skill was
    localized over, also those where its region is empty: the base
    fingerprint covers exactly these. ``dtypes`` records their base dtypes.
    ``routing`` says how the skill's routing centroids were made (empty when
    it has none).
    """

    name: str
    base_fingerprint: str
    sparsity: float
    shapes: dict[str, list[int]]
    task: str = ""
    method: str = "dataless"
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    value_dtype: str = "float32"
    dtypes: dict[str, str] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format_version: int = 1  # the layout the file needs: 2 once it keeps examples (raised when written)

    def to_json(self) -> str:
        """Serialize to a JSON string."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SkillMetadata:
        """Parse :meth:`to_json` output, refusing newer formats."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise SkillFileError("the skill header is not a JSON object; the file is not a skill or is damaged.")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise SkillFileError(
                f"skill format version {version!r} is newer than this skillbank reads ({FORMAT_VERSION}); "
                "upgrade skillbank (pip install -U skillbank)."
            )
        problem = _metadata_problem(data)
        if problem:
            raise SkillFileError(f"the skill header is crafted or damaged: {problem}.")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Skill:
    """One task's skill: sparse regions (base names), dense head (finetuned names), metadata.

    ``centroids`` (``[C, D]`` float32, or ``None``) are the base model's
    features of a few of the task's examples: what :class:`~skillbank.stitching.routing.SkillRouter`
    compares an input with when a request does not name its task. ``examples`` (or ``None``) are a few
    tokenized, labelled examples kept to weigh this skill against others in a composition. ``low_rank``
    (base names) are weight matrices' low-rank parts, added to the sparse regions there.
    """

    metadata: SkillMetadata
    regions: dict[str, Region]
    head: dict[str, Tensor] = field(default_factory=dict)
    centroids: Tensor | None = None
    examples: Examples | None = None
    low_rank: dict[str, LowRank] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The skill's unique name in a bank."""
        return self.metadata.name

    def touches(self, parameter: str) -> bool:
        """Whether the skill changes ``parameter`` (base name): a non-empty region there, or a low-rank part."""
        region = self.regions.get(parameter)
        return parameter in self.low_rank or (region is not None and len(region) > 0)

    @property
    def num_entries(self) -> int:
        """How many task-vector entries the skill carries (``k``)."""
        return sum(len(r) for r in self.regions.values())

    @property
    def num_low_rank(self) -> int:
        """How many values its low-rank parts hold (``Σ r·(m + n)``)."""
        return sum(part.numel for part in self.low_rank.values())

    @property
    def num_shared(self) -> int:
        """How many entries its shared parameters hold (``P``)."""
        return sum(math.prod(s) for s in self.metadata.shapes.values())

    def to_bytes(self) -> bytes:
        """Serialize to safetensors bytes (values in ``metadata.value_dtype``: a float dtype, or a code of a few
        bits with positions in their smallest code and low-rank parts in bfloat16)."""
        bits = VALUE_CODE_BITS.get(self.metadata.value_dtype)
        value_dtype = torch.bfloat16 if bits else VALUE_DTYPES[self.metadata.value_dtype]
        tensors: dict[str, Tensor] = {}
        for name, region in self.regions.items():
            if not len(region):
                continue
            numel = math.prod(self.metadata.shapes[name])
            if bits:
                codes = {**encode_positions(region.indices, numel), **encode_values(region.values, bits)}
            else:
                codes = {**encode_indices(region.indices, numel), "val": region.values.detach().to("cpu", value_dtype)}
            for part, code in codes.items():
                tensors[f"region/{name}/{part}"] = code.contiguous()
        for name, tensor in self.head.items():
            tensors[f"head/{name}"] = tensor.detach().to("cpu").contiguous().clone()
        if self.centroids is not None:
            tensors[CENTROIDS_KEY] = _checked_centroids(self.centroids, self.name).to("cpu", torch.float32).contiguous().clone()
        metadata = self.metadata
        if self.low_rank:
            tensors.update(low_rank_tensors(self.low_rank, value_dtype))
        if self.examples is not None:
            tensors.update(self.examples.to_tensors())
        if self.examples is not None or self.low_rank:  # format 2; a skill without either stays readable by 1's readers
            metadata = replace(metadata, format_version=max(metadata.format_version, 2))
        if bits:  # format 3: coded values and positions
            metadata = replace(metadata, format_version=3)
        return st_save(tensors, metadata={_HEADER_KEY: metadata.to_json()})

    @classmethod
    def from_bytes(cls, data: bytes, origin: str = "skill") -> Skill:
        """Parse safetensors bytes written by :meth:`to_bytes`.

        Raises:
            SkillFileError: naming ``origin``, when the bytes are not a valid
                safetensors file, not a skill, or from a newer format.
        """
        try:
            tensors = st_load(data)
            header = _read_header(data)
        except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SkillFileError(
                f"{origin} is not a readable safetensors file ({str(exc)[:120]}); it is truncated or corrupted."
            ) from None
        if _HEADER_KEY not in header:
            raise SkillFileError(f"{origin} is a safetensors file but not a skill (no {_HEADER_KEY!r} metadata).")
        try:
            metadata = SkillMetadata.from_json(header[_HEADER_KEY])
        except (ValueError, TypeError, RecursionError) as exc:  # ValueError: bad JSON or an integer of thousands of digits
            raise SkillFileError(f"{origin} has an unreadable skill header ({str(exc)[:120]}).") from None
        parts: dict[str, dict[str, Tensor]] = {}
        head: dict[str, Tensor] = {}
        centroids = tensors.pop(CENTROIDS_KEY, None)
        if centroids is not None:
            centroids = _checked_centroids(centroids, origin).float()
        examples = Examples.from_tensors({k: tensors.pop(k) for k in Examples.keys(list(tensors))}, origin)
        low_rank = low_rank_from_tensors(tensors, metadata.shapes, origin)
        if (examples is not None or low_rank) and metadata.format_version < 2:
            raise SkillFileError(
                f"{origin} holds examples or low-rank parts but declares format {metadata.format_version}; it is damaged."
            )
        bits = VALUE_CODE_BITS.get(metadata.value_dtype)
        if bits is not None and metadata.format_version < 3:
            raise SkillFileError(f"{origin} holds coded values but declares format {metadata.format_version}; it is damaged.")
        for key, tensor in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "head":
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise SkillFileError(f"{origin}: head tensor {rest!r} holds NaN or infinite values.")
                head[rest] = tensor
            elif kind == "region":
                name, _, part = rest.rpartition("/")
                parts.setdefault(name, {})[part] = tensor
            else:
                raise SkillFileError(f"{origin} holds an unexpected tensor {key!r}.")
        regions = {}
        for name, shape in metadata.shapes.items():
            codes = parts.pop(name, None)
            if codes is None:
                regions[name] = Region(torch.empty(0, dtype=torch.int64, device="cpu"), torch.empty(0, device="cpu"))
                continue
            values = codes.pop("val", None)
            coded: dict[str, Tensor] = {part: codes.pop(part) for part in ("val_code", "val_levels") if part in codes}
            if (bits is not None) != (values is None) or (coded and not bits):
                raise SkillFileError(
                    f"{origin}: region {name!r} stores its values in another form than the header's {metadata.value_dtype!r}."
                )
            try:
                if bits:
                    indices = decode_positions(codes, math.prod(shape))
                    values = decode_values(coded, indices.numel(), bits)
                else:
                    indices = decode_indices(codes, math.prod(shape))
            except ValueError as exc:
                raise SkillFileError(f"{origin}: region {name!r} is damaged: {exc}") from exc
            if values is None or values.numel() != indices.numel():
                raise SkillFileError(f"{origin}: region {name!r} has {indices.numel()} indices but no matching values.")
            if values.dtype not in VALUE_DTYPES.values():
                raise SkillFileError(
                    f"{origin}: region {name!r} stores {values.dtype} values; a skill stores {', '.join(VALUE_DTYPES)} only."
                )
            regions[name] = Region(indices, values.float())
        if parts:
            raise SkillFileError(f"{origin} has regions for parameters its header does not list: {sorted(parts)[:5]}.")
        return cls(metadata=metadata, regions=regions, head=head, centroids=centroids, examples=examples, low_rank=low_rank)

    def save(self, path: str | Path) -> None:
        """Write the skill to ``path`` (not atomic; a :class:`SkillBank` writes atomically)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Skill:
        """Read a skill file written by :meth:`save`."""
        return cls.from_bytes(Path(path).read_bytes(), origin=str(path))


#: Bounds on a skill header (reads stay bounded whatever a crafted file declares).
_MAX_PARAMETERS, _MAX_DIMS, _MAX_TEXT = 1_000_000, 8, 4096
_TEXT_FIELDS = ("name", "base_fingerprint", "task", "method", "value_dtype", "created")
_DICT_FIELDS = ("settings", "metrics", "source", "dtypes", "routing")


def _metadata_problem(data: dict[str, Any]) -> str:
    """What is wrong with a skill header's fields ("" if nothing): types, sizes and the shapes table."""
    for key in _TEXT_FIELDS:
        if key in data and (not isinstance(data[key], str) or len(data[key]) > _MAX_TEXT):
            return f"{key!r} must be a string of at most {_MAX_TEXT} characters"
    for key in _DICT_FIELDS:
        if key in data and not isinstance(data[key], dict):
            return f"{key!r} must be an object"
    for key in ("name", "base_fingerprint", "shapes"):
        if key not in data:
            return f"it has no {key!r}"
    sparsity = data.get("sparsity")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity <= 1:
        return "'sparsity' must be a number in [0, 1]"
    if data.get("value_dtype", "float32") not in VALUE_FORMATS:
        return f"'value_dtype' must be one of {', '.join(VALUE_FORMATS)}"
    shapes = data["shapes"]
    if not isinstance(shapes, dict) or len(shapes) > _MAX_PARAMETERS:
        return f"'shapes' must map at most {_MAX_PARAMETERS:,} parameter names to shapes"
    for name, shape in shapes.items():
        if (
            len(name) > _MAX_TEXT
            or not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
            or math.prod(shape) >= 2**40
        ):
            return f"the shape of {name[:80]!r} must be a list of at most {_MAX_DIMS} sizes (non-negative integers)"
    return ""


def _checked_centroids(centroids: Tensor, origin: str) -> Tensor:
    """``centroids`` if they are a finite floating ``[C, D]`` matrix within the bounds, else a :class:`SkillFileError`."""
    if (
        centroids.dim() != 2
        or not centroids.is_floating_point()
        or not 1 <= centroids.shape[0] <= MAX_CENTROIDS
        or not 1 <= centroids.shape[1] <= MAX_FEATURE_DIM
    ):
        raise SkillFileError(
            f"{origin}: routing centroids must be a float [C, D] matrix with 1 <= C <= {MAX_CENTROIDS} "
            f"and 1 <= D <= {MAX_FEATURE_DIM}, got {centroids.dtype} {list(centroids.shape)}."
        )
    if not torch.isfinite(centroids).all():
        raise SkillFileError(f"{origin}: routing centroids hold NaN or infinite values.")
    return centroids


def _read_header(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    return header.get("__metadata__", {}) or {}
