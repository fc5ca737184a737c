"""``LowRank``: a skill's low-rank part of one weight matrix, ``τ ≈ left @ right`` (its top singular directions).

Beside (or nearly instead of) the sparse region, a skill may carry per weight matrix the top ``r`` singular
directions of its task vector, as TSV-C compresses task vectors: ``left = U_r · diag(σ_r)`` (``[m, r]``) and
``right = V_rᵀ`` (``[r, n]``). It is dense over its matrix, so it composes matrix by matrix
(:class:`~skillbank.stitching.spectral_stitcher.SpectralStitcher`), not entry by entry. Stored in the skill file
as ``lowrank/<parameter>/left`` and ``.../right`` in the skill's value dtype; checked on every read.

>>> import torch
>>> part = LowRank(torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 3.0]]))
>>> part.rank, part.dense().tolist(), part.numel
(1, [[2.0, 6.0], [0.0, 0.0]], 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from skillbank.errors import SkillFileError

__all__ = ["LowRank", "low_rank_from_tensors", "low_rank_tensors"]

_PREFIX = "lowrank/"


@dataclass
class LowRank:
    """``left`` (``[m, r]``) and ``right`` (``[r, n]``), float; the part is ``left @ right``. Checked when made."""

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        left, right = self.left, self.right
        if (
            left.dim() != 2
            or right.dim() != 2
            or not left.is_floating_point()
            or not right.is_floating_point()
            or left.shape[1] != right.shape[0]
            or not 1 <= left.shape[1] <= min(left.shape[0], right.shape[1])
        ):
            raise SkillFileError(
                "a low-rank part must be float [m, r] and [r, n] factors with 1 <= r <= min(m, n), got "
                f"{left.dtype} {list(left.shape)} and {right.dtype} {list(right.shape)}."
            )
        if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
            raise SkillFileError("a low-rank part holds NaN or infinite values.")

    @property
    def rank(self) -> int:
        """``r``, the number of singular directions kept."""
        return self.left.shape[1]

    @property
    def shape(self) -> list[int]:
        """The matrix's shape ``[m, n]``."""
        return [self.left.shape[0], self.right.shape[1]]

    @property
    def numel(self) -> int:
        """How many values the two factors hold: ``r · (m + n)``."""
        return self.left.numel() + self.right.numel()

    def dense(self) -> Tensor:
        """The part as a dense float32 ``[m, n]`` matrix."""
        return self.left.float() @ self.right.float()


def low_rank_tensors(parts: Mapping[str, LowRank], dtype: torch.dtype) -> dict[str, Tensor]:
    """The skill file's ``lowrank/`` tensors, in ``dtype``."""
    out = {}
    for name, part in parts.items():
        out[f"{_PREFIX}{name}/left"] = part.left.detach().to("cpu", dtype).contiguous()
        out[f"{_PREFIX}{name}/right"] = part.right.detach().to("cpu", dtype).contiguous()
    return out


def low_rank_from_tensors(tensors: dict[str, Tensor], shapes: Mapping[str, Sequence[int]], origin: str) -> dict[str, LowRank]:
    """Pop and read the ``lowrank/`` tensors of ``tensors`` (float32), each checked against its parameter's
    shape in ``shapes``; a :class:`SkillFileError` naming ``origin`` for anything else."""
    factors: dict[str, dict[str, Tensor]] = {}
    for key in [k for k in tensors if k.startswith(_PREFIX)]:
        name, _, side = key[len(_PREFIX) :].rpartition("/")
        if side not in ("left", "right") or not name:
            raise SkillFileError(f"{origin} holds an unexpected tensor {key!r}.")
        factors.setdefault(name, {})[side] = tensors.pop(key)
    parts = {}
    for name, pair in factors.items():
        shape = list(shapes.get(name, []))
        if len(shape) != 2 or set(pair) != {"left", "right"}:
            raise SkillFileError(
                f"{origin}: the low-rank part of {name[:80]!r} needs a left and a right factor of a weight matrix its "
                "header lists; the file is crafted or damaged."
            )
        dtypes = {pair["left"].dtype, pair["right"].dtype}
        if not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
            raise SkillFileError(
                f"{origin}: the low-rank part of {name[:80]!r} must be float factors (float32, bfloat16, float16), "
                f"not {sorted(map(str, dtypes))}; the file is crafted or damaged."
            )
        try:
            part = LowRank(pair["left"].float(), pair["right"].float())
        except SkillFileError as exc:
            raise SkillFileError(f"{origin}: {name[:80]!r}: {exc}") from None
        if part.shape != shape:
            raise SkillFileError(f"{origin}: the low-rank part of {name[:80]!r} is {part.shape}, its parameter {shape}.")
        parts[name] = part
    return parts
