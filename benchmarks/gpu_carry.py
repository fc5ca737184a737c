"""Pack the real benchmark's pulled files small enough to travel to a GPU machine, and unpack them there.

A lent GPU machine has no network and takes at most 64 MiB with the checkout. The pulled
files are ~121 MB: MiniLM's float32 weights (91 MB) and the data sets' text (~30 MB).
``pack`` copies the pulled cache into a git-ignored folder with the weights in float16
(``model.fp16.safetensors``) and every other file over 1 MB compressed (``<name>.xz``):
about 55 MB. ``unpack`` restores a packed folder in place: the text files byte for byte,
the weights as float32 again (float16-rounded: say so beside any figure measured with
them). ``benchmarks/gpu_check.sh`` unpacks ``$SKILLBANK_CACHE`` before it starts.

    python benchmarks/gpu_carry.py pack benchmarks/_carry      # here: pulls first if needed
    python benchmarks/gpu_carry.py unpack benchmarks/_carry    # there (gpu_check.sh does it)

then, on the device: ``SKILLBANK_CACHE=benchmarks/_carry bash benchmarks/gpu_check.sh``
with ``carry=["benchmarks/_carry"]``.
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS = "model.safetensors"
HALF = "model.fp16.safetensors"
COMPRESS_ABOVE = 1 << 20  # bytes: smaller files travel as they are
LIMIT = 60 << 20  # bytes for the packed folder: the checkout itself needs the rest of the 64 MiB
_CHUNK = 1 << 20
#: The most one unpacked file may grow to (the largest pulled text file is ~20 MB): a crafted .xz stops there.
MAX_UNPACKED = 256 << 20


def pack(cache: Path, out: Path, limit: int = LIMIT) -> int:
    """Copy a pulled cache's files (``cache/pypi``: nothing else there, such as bench_real's default work folder)
    into a fresh ``out``, the weights halved and large files compressed; the bytes it takes.

    Raises:
        SystemExit: ``out`` exists already, or the packed folder is larger than ``limit``.
    """
    if out.exists():
        raise SystemExit(f"{out} exists already; remove it (or name another folder) to pack afresh.")
    staged = out.with_name(out.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    pulled = [p for p in (cache / "pypi").rglob("*") if p.is_file()]
    for source in sorted(p for p in pulled if not any(part.startswith(".pull-") for part in p.relative_to(cache).parts)):
        target = staged / source.relative_to(cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.name == WEIGHTS:
            _cast_floats(source, target.with_name(HALF), torch.float16)
        elif source.stat().st_size > COMPRESS_ABOVE:
            with source.open("rb") as raw, lzma.open(target.with_name(target.name + ".xz"), "wb", preset=6) as packed:
                shutil.copyfileobj(raw, packed, _CHUNK)
        else:
            shutil.copy2(source, target)
    size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
    if size > limit:
        shutil.rmtree(staged)
        raise SystemExit(f"the packed files take {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB that can travel.")
    staged.rename(out)
    return size


def unpack(folder: Path, max_file: int = MAX_UNPACKED) -> list[Path]:
    """Restore a packed ``folder`` in place (``.xz`` files decompressed, float16 weights back to float32); the files
    restored. Each is written beside its packed form and renamed into place, so an interrupted unpack can be rerun.

    Only regular files are read and written: a packed file or a leftover ``.partial`` that is a link, a directory or
    a special file is refused (a link there is removed, never written through), and no file grows past ``max_file``.

    Raises:
        SystemExit: naming the file that is not what a pack makes.
    """
    restored = []
    for packed in sorted(folder.rglob("*.xz")):
        _require_regular(packed)
        target = packed.with_suffix("")
        with lzma.open(packed, "rb") as source, _fresh(target.with_name(target.name + ".partial")) as raw:
            written = 0
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > max_file:
                    raise SystemExit(f"{packed} expands past {max_file / 2**20:.0f} MiB: not a file a pack makes; stopped.")
                raw.write(chunk)
        target.with_name(target.name + ".partial").replace(target)
        packed.unlink()
        restored.append(target)
    for half in sorted(folder.rglob(HALF)):
        _require_regular(half)
        target = half.with_name(WEIGHTS)
        _cast_floats(half, target, torch.float32)
        half.unlink()
        restored.append(target)
    return restored


def _require_regular(path: Path) -> None:
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise SystemExit(f"{path} is not a regular file (a link, directory or special file): not what a pack makes.")


def _fresh(path: Path):  # noqa: ANN202 - an open binary file
    """``path`` opened for writing as a new regular file: a leftover there (a file or a link, never followed) is
    removed first, and the open refuses to follow a link put there meanwhile."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise SystemExit(f"{path} is a directory where unpack writes a file; remove it and rerun.")
        path.unlink()
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb")


def _cast_floats(source: Path, target: Path, dtype: torch.dtype) -> None:
    """``source``'s tensors with the floating-point ones cast to ``dtype``, written to ``target`` (renamed into place)."""
    from safetensors.torch import save

    state = load_file(source)
    partial = target.with_name(target.name + ".partial")
    data = save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, metadata={"format": "pt"})
    with _fresh(partial) as raw:
        raw.write(data)
    partial.replace(target)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="pull if needed, then pack the cache into FOLDER (a new, git-ignored one)")
    packing.add_argument("folder", type=Path)
    packing.add_argument(
        "--cache", type=Path, default=None, help="the pulled cache (default: $SKILLBANK_CACHE or ~/.cache/skillbank)"
    )
    unpacking = verbs.add_parser("unpack", help="restore a packed FOLDER in place")
    unpacking.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        from skillbank.integrations.pulled.wheels import default_cache, pull

        cache = args.cache or default_cache()
        pull(cache=cache)
        size = pack(cache, args.folder)
        print(f"packed {cache} into {args.folder}: {size / 2**20:.1f} MiB")
    else:
        restored = unpack(args.folder)
        print(f"unpacked {len(restored)} files in {args.folder}")


if __name__ == "__main__":
    sys.exit(main())
