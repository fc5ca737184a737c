"""``SkillBank``: a durable, append-only directory of skills.

Layout: ``manifest.json`` (skills in the order added, each with file name, byte
size, sha256 and a summary; the bank's base fingerprint; the format version;
a checksum of the manifest itself) and one ``<name>.safetensors`` per skill.
Writers hold an exclusive lock, write the skill file durably first and the
manifest second, each by write-temp/fsync/rename/fsync-dir: a crash at any
moment leaves the bank openable with every acknowledged skill intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from skillbank.durable import TMP_PREFIX, atomic_write, exclusive_lock, fsync_dir
from skillbank.errors import BankError, BaseMismatchError, SkillFileError, SkillNameError
from skillbank.skill import FORMAT_VERSION, Skill

__all__ = ["SkillBank", "SkillEntry", "check_skill_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MANIFEST = "manifest.json"
_LOCK = ".lock"


def check_skill_name(name: str) -> str:
    """Return ``name`` if it is a safe skill name, else raise :class:`SkillNameError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SkillNameError(
            f"invalid skill name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators or spaces)."
        )
    return name


@dataclass(frozen=True)
class SkillEntry:
    """One skill's line in the manifest."""

    name: str
    file: str
    bytes: int
    sha256: str
    task: str = ""
    method: str = ""
    sparsity: float = 0.0
    entries: int = 0
    value_dtype: str = "float32"
    created: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkillEntry:
        """Parse a manifest line, ignoring fields a newer release may add."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _manifest_checksum(body: dict[str, Any]) -> str:
    return _sha256(json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True).encode())


class SkillBank:
    """A directory registry of skills: ``add``, ``get``, ``list``, ``remove``, ``verify``.

    Every read checks the file's sha256 against the manifest and the skill's
    base fingerprint against the bank's. Many processes may read and write one
    bank at once; writes are serialized by a file lock.

    Args:
        path: the bank directory; created (with parents) if missing and ``create``.
        create: whether a missing bank may be created.
        lock_timeout: seconds a writer waits for another writer before failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, lock_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        if self.path.exists() and not self.path.is_dir():
            raise BankError(f"bank path {self.path} is a file, not a directory; pass a directory (new or existing bank).")
        if not (self.path / _MANIFEST).is_file():
            if not create:
                raise BankError(f"no skill bank at {self.path} (no {_MANIFEST}); pass create=True to make one.")
            self._initialize()
        self._read_manifest()
        if self.writable:
            self._cleanup_quietly()

    # -- reading -----------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether this process may write the bank (a directory with no write bits counts as read-only, also for root)."""
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
        except OSError:
            return False
        return bool(mode & 0o222) and os.access(self.path, os.W_OK)

    @property
    def base_fingerprint(self) -> str | None:
        """Fingerprint of the base every skill in the bank was localized on (None while empty)."""
        return self._read_manifest()["base_fingerprint"]

    def list(self) -> list[SkillEntry]:
        """Entries of every skill, in the order they were added."""
        return [SkillEntry.from_dict(e) for e in self._read_manifest()["skills"]]

    def names(self) -> list[str]:
        """Names of every skill, in the order they were added."""
        return [e.name for e in self.list()]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.list())

    def __iter__(self) -> Iterator[SkillEntry]:
        return iter(self.list())

    def entry(self, name: str) -> SkillEntry:
        """The manifest entry of ``name``; :class:`SkillNameError` if unknown."""
        for entry in self.list():
            if entry.name == name:
                return entry
        known = self.names()
        raise SkillNameError(f"no skill named {name!r} in {self.path}; it holds {known if known else 'no skills yet'}.")

    def get(self, name: str) -> Skill:
        """Load skill ``name``, checking its size, sha256 and base fingerprint."""
        entry = self.entry(name)
        return self._load(entry, self.base_fingerprint)

    def verify(self) -> dict[str, str]:
        """Check every skill; returns ``{name: "ok" or what is wrong}``."""
        base = self.base_fingerprint
        report = {}
        for entry in self.list():
            try:
                self._load(entry, base)
                report[entry.name] = "ok"
            except (SkillFileError, BaseMismatchError, OSError) as exc:
                report[entry.name] = str(exc)
        return report

    # -- writing -----------------------------------------------------------

    def add(self, skill: Skill) -> SkillEntry:
        """Add ``skill`` durably; returns its manifest entry once it is safe on disk.

        Raises:
            SkillNameError: the name is unsafe or already in the bank.
            BaseMismatchError: the skill comes from another base model.
            BankError: the bank is read-only.
        """
        check_skill_name(skill.name)
        for pname, region in skill.regions.items():
            if not bool(torch.isfinite(region.values).all()):
                raise SkillFileError(f"skill {skill.name!r} has NaN/Inf values in {pname!r}; refusing to store it.")
        if skill.num_entries == 0:
            raise SkillFileError(f"skill {skill.name!r} has an empty mask (no entries); localize with a larger sparsity.")
        data = skill.to_bytes()
        entry = SkillEntry(
            name=skill.name,
            file=f"{skill.name}.safetensors",
            bytes=len(data),
            sha256=_sha256(data),
            task=skill.metadata.task,
            method=skill.metadata.method,
            sparsity=skill.metadata.sparsity,
            entries=skill.num_entries,
            value_dtype=skill.metadata.value_dtype,
            created=skill.metadata.created,
            metrics=dict(skill.metadata.metrics),
        )
        with self._locked():
            manifest = self._read_manifest()
            if any(e["name"] == skill.name for e in manifest["skills"]):
                raise SkillNameError(f"a skill named {skill.name!r} is already in {self.path}; pick another name or remove it first.")
            base = manifest["base_fingerprint"]
            if base is not None and base != skill.metadata.base_fingerprint:
                raise BaseMismatchError(
                    f"skill {skill.name!r} was localized on another base model (fingerprint "
                    f"{skill.metadata.base_fingerprint[:12]}…, bank {base[:12]}…); use a bank for that base."
                )
            atomic_write(self.path / entry.file, data)
            manifest["base_fingerprint"] = skill.metadata.base_fingerprint
            manifest["skills"].append(asdict(entry))
            self._write_manifest(manifest)
        return entry

    def remove(self, name: str) -> None:
        """Remove skill ``name`` (manifest first, then its file)."""
        with self._locked():
            manifest = self._read_manifest()
            kept = [e for e in manifest["skills"] if e["name"] != name]
            if len(kept) == len(manifest["skills"]):
                self.entry(name)  # raises with the list of known names
            removed = next(e for e in manifest["skills"] if e["name"] == name)
            manifest["skills"] = kept
            self._write_manifest(manifest)
            (self.path / removed["file"]).unlink(missing_ok=True)
            fsync_dir(self.path)

    # -- internals ---------------------------------------------------------

    def _initialize(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BankError(f"cannot create a bank at {self.path}: {exc.strerror}.") from exc
        stray = [p.name for p in self.path.iterdir() if p.name != _LOCK and not p.name.startswith(TMP_PREFIX)]
        if stray:
            raise BankError(
                f"{self.path} is not empty and holds no {_MANIFEST}: not a skill bank. "
                f"Pick an empty or new directory (found e.g. {sorted(stray)[:3]})."
            )
        with self._locked():
            if not (self.path / _MANIFEST).is_file():
                self._write_manifest({"format": "skillbank", "format_version": FORMAT_VERSION, "base_fingerprint": None, "skills": []})

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / _MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise BankError(f"{path} is missing: {self.path} is not (or no longer) a skill bank.") from exc
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankError(f"{path} is damaged (not valid JSON: {exc}); restore it from a backup.") from exc
        version = body.get("format_version") if isinstance(body, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise BankError(
                f"{path} has format version {version}, newer than this skillbank reads ({FORMAT_VERSION}); "
                "upgrade skillbank (pip install -U skillbank)."
            )
        # The checksum covers the content; comparing with the canonical bytes catches any other flipped byte.
        if not isinstance(body, dict) or body.get("checksum") != _manifest_checksum(body) or raw != _manifest_bytes(body):
            raise BankError(f"{path} is damaged (its checksum does not match its bytes); restore it from a backup.")
        return body

    def _write_manifest(self, body: dict[str, Any]) -> None:
        body = {k: v for k, v in body.items() if k != "checksum"}
        body["checksum"] = _manifest_checksum(body)
        atomic_write(self.path / _MANIFEST, _manifest_bytes(body))

    def _load(self, entry: SkillEntry, base: str | None) -> Skill:
        path = self.path / entry.file
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SkillFileError(f"skill {entry.name!r}: its file {path} is missing.") from exc
        if len(data) != entry.bytes:
            raise SkillFileError(f"skill {entry.name!r}: {path} has {len(data)} bytes, the manifest says {entry.bytes} (truncated or damaged).")
        if _sha256(data) != entry.sha256:
            raise SkillFileError(f"skill {entry.name!r}: {path} fails its sha256 check (corrupted); restore it or remove the skill.")
        skill = Skill.from_bytes(data, origin=str(path))
        if skill.name != entry.name:
            raise SkillFileError(f"{path} holds skill {skill.name!r}, the manifest expects {entry.name!r}.")
        if base is not None and skill.metadata.base_fingerprint != base:
            raise BaseMismatchError(f"skill {entry.name!r} in {path} was localized on another base model than the bank's.")
        return skill

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the write lock; first remove temporary files of crashed writers."""
        if not self.writable:
            raise BankError(
                f"bank {self.path} is read-only; reading works, but to add or remove skills "
                "make the directory writable or copy the bank elsewhere."
            )
        with exclusive_lock(self.path / _LOCK, timeout=self.lock_timeout):
            self._cleanup()
            yield

    def _cleanup_quietly(self) -> None:
        try:
            with exclusive_lock(self.path / _LOCK, timeout=0):
                self._cleanup()
        except BankError:
            pass  # another writer holds the lock; it cleans up itself

    def _cleanup(self) -> None:
        removed = False
        for leftover in self.path.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
            removed = True
        if removed:
            fsync_dir(self.path)

