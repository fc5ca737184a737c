"""``SkillBank``: a durable, append-only directory of skills.

Layout: ``manifest.json`` (skills in the order added, each with file name, byte
size, sha256 and a summary; the bank's base fingerprint; the format version;
a checksum of the manifest itself) and one ``<name>.safetensors`` per skill.
Writers hold an exclusive lock, write the skill file durably first and the
manifest second, each by write-temp/fsync/rename/fsync-dir: a crash at any
moment leaves the bank openable with every acknowledged skill intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skillbank.errors import BankError, BaseMismatchError, SkillFileError, SkillNameError
from skillbank.storage.durable import TMP_PREFIX, atomic_write, exclusive_lock, fsync_dir
from skillbank.storage.format import MANIFEST_VERSION

if TYPE_CHECKING:  # reading the manifest (list, names, entry) needs neither torch nor the skill format
    from skillbank.storage.skill import Skill

__all__ = [
    "MAX_MANIFEST_BYTES",
    "MAX_SKILL_BYTES",
    "MAX_TAGS",
    "MAX_VERSIONS_KEPT",
    "SkillBank",
    "SkillEntry",
    "check_skill_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MANIFEST = "manifest.json"
_LOCK = ".lock"
#: The temporary files :func:`~skillbank.storage.durable.atomic_write` makes; clean-up removes these and nothing else.
_OWN_TMP = re.compile(re.escape(TMP_PREFIX) + r"[0-9a-f]{32}-.+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
MAX_TAGS = 32
#: Earlier versions whose provenance a replaced skill keeps (``source["replaces"]``); older ones are counted only.
MAX_VERSIONS_KEPT = 16
#: The largest integer a manifest may hold in a count (entries, bytes): 2**53, what a JSON number holds exactly.
_MAX_INT = 2**53
_VERSIONED = re.compile(r"(.+)\.[0-9a-f]{12}")
#: What a writer may leave behind when killed: a skill file (``<name>[.<12 hex>].safetensors``) or a temporary file.
_LEFTOVER = re.compile(rf"{_NAME.pattern}\.safetensors|{_OWN_TMP.pattern}")
#: The largest manifest and skill file a bank reads (reads stay bounded whatever a crafted bank declares).
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_SKILL_BYTES = 16 * 2**30
#: Manifest fields a reader relies on, with their types (others are summaries, type-checked too).
_REQUIRED = {"name": str, "file": str, "bytes": int, "sha256": str}
_SUMMARY: dict[str, type | tuple[type, ...]] = {
    "task": str,
    "method": str,
    "sparsity": (int, float),
    "entries": int,
    "shared": int,
    "value_dtype": str,
    "created": str,
    "metrics": dict,
    "tags": list,
    "note": str,
}
_MAX_TEXT = 4096
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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
    shared: int = 0  # the model entries the skill was localized over (0: a manifest from before this field)
    value_dtype: str = "float32"
    created: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def bits_per_parameter(self) -> float | None:
        """The skill file's size in bits per model entry it covers (``None`` when the manifest predates ``shared``)."""
        return self.bytes * 8 / self.shared if self.shared > 0 else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkillEntry:
        """Parse a manifest line, ignoring fields a newer release may add."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class _Snapshot:
    """One validated parse of the manifest, reused while the file holds the same bytes."""

    raw: bytes
    base_fingerprint: str | None
    entries: tuple[SkillEntry, ...]
    by_name: dict[str, SkillEntry]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode()


def _manifest_checksum(body: dict[str, Any]) -> str:
    return _sha256(json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True).encode())


class SkillBank:
    """A directory registry of skills: ``add``, ``get``, ``entries``, ``remove``, ``verify``.

    Every read checks the file's sha256 against the manifest and the skill's
    base fingerprint against the bank's. Many processes may read and write one
    bank at once; writes are serialized by a file lock. Every call reads the
    manifest's bytes, but parses and validates them only when they changed, so
    a command over thousands of skills stays linear in their number.

    Args:
        path: the bank directory; created (with parents) if missing and ``create``.
        create: whether a missing bank may be created.
        lock_timeout: seconds a writer waits for another writer before failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, lock_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._snapshot: _Snapshot | None = None
        if self.path.exists() and not self.path.is_dir():
            raise BankError(f"bank path {self.path} is a file, not a directory; pass a directory (new or existing bank).")
        if not (self.path / _MANIFEST).is_file():
            if not create:
                raise BankError(
                    f"no skill bank at {self.path} (no {_MANIFEST}); check the path. A bank is made by "
                    f"the first skill added to it (skillbank localize --bank {self.path} ...)."
                )
            self._initialize()
        self._read_manifest()  # a read never writes: clean-up happens under a writer's lock

    @classmethod
    def if_exists(cls, path: str | os.PathLike[str], **kwargs: Any) -> SkillBank | None:
        """The bank at ``path``, or ``None`` when there is none yet (never creates one)."""
        return cls(path, create=False, **kwargs) if (Path(path) / _MANIFEST).is_file() else None

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
        return self._current().base_fingerprint

    def entries(self) -> list[SkillEntry]:
        """Entries of every skill, in the order they were added."""
        return list(self._current().entries)

    def names(self) -> list[str]:
        """Names of every skill, in the order they were added."""
        return [e.name for e in self._current().entries]

    def __contains__(self, name: object) -> bool:
        return name in self._current().by_name

    def __len__(self) -> int:
        return len(self._current().entries)

    def __iter__(self) -> Iterator[SkillEntry]:
        return iter(self.entries())

    def entry(self, name: str) -> SkillEntry:
        """The manifest entry of ``name``; :class:`SkillNameError` if unknown."""
        found = self._current().by_name.get(name)
        if found is not None:
            return found
        raise self._unknown(name)

    def get(self, name: str) -> Skill:
        """Load skill ``name``, checking its size, sha256 and base fingerprint."""
        snapshot = self._current()
        entry = snapshot.by_name.get(name) or self.entry(name)
        return self._load(entry, snapshot.base_fingerprint)

    def routable(self, name: str) -> bool:
        """Whether skill ``name`` carries routing centroids, told from its file's header alone: no tensor is read or
        checked (:meth:`get` does that), so a server can tell whether to route without reading every skill."""
        from skillbank.storage.skill import CENTROIDS_KEY

        entry = self.entry(name)
        path = self.path / entry.file
        with _skill_file_errors(name, path), _open_regular(path, entry.bytes, MAX_SKILL_BYTES) as (fd, size):
            header, _ = _safetensors_header(fd, size, path)
        return CENTROIDS_KEY in header

    def verify(self) -> dict[str, str]:
        """Check every skill; returns ``{name: "ok" or what is wrong}``.

        Besides each file's size, sha256, format, finite values and base, a skill whose
        routing centroids are the same bytes as an earlier skill's is reported: it would
        take that skill's requests. Files no skill owns are :meth:`orphans`.
        """
        snapshot = self._current()
        base = snapshot.base_fingerprint
        report = {}
        routed: dict[str, str] = {}  # sha256 of a skill's centroids -> the first skill that has them
        for entry in snapshot.entries:
            try:
                skill = self._load(entry, base)
            except (SkillFileError, BaseMismatchError, OSError) as exc:
                report[entry.name] = str(exc)
                continue
            report[entry.name] = "ok"
            if skill.centroids is not None:
                digest = _sha256(skill.centroids.numpy().tobytes())
                first = routed.setdefault(digest, entry.name)
                if first != entry.name:
                    report[entry.name] = (
                        f"its routing centroids are identical to {first!r}'s: routed requests of that task would come "
                        "to it; remove it unless it is that skill's copy"
                    )
        return report

    def orphans(self) -> list[str]:
        """Files in the bank that look like skill files but no manifest line names (a killed ``replace`` or ``add``
        leaves one), and temporary files of crashed writers; :meth:`gc` removes them, nothing else does."""
        named = {e.file for e in self._current().entries}
        found = []
        with os.scandir(self.path) as listing:
            for item in listing:
                if item.name not in named and _LEFTOVER.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                    found.append(item.name)
        return sorted(found)

    def gc(self) -> list[str]:
        """Delete :meth:`orphans` under the write lock (the manifest read again there); returns the names removed."""
        with self._locked(clean=False):
            self._read_manifest()
            removed = [name for name in self.orphans() if _unlink_regular(self.path / name)]
            if removed:
                fsync_dir(self.path)
        return removed

    # -- writing -----------------------------------------------------------

    def add(self, skill: Skill, *, tags: Sequence[str] = (), note: str = "") -> SkillEntry:
        """Add ``skill`` durably; returns its manifest entry once it is safe on disk.

        ``tags`` and ``note`` label it in the manifest (a registry's own data, changed
        later with :meth:`annotate` without touching the skill's file).

        Raises:
            SkillNameError: the name is unsafe or already in the bank.
            BaseMismatchError: the skill comes from another base model.
            BankError: the bank is read-only.
        """
        _check_storable(skill)
        tags, note = _checked_labels(tags, note)
        data = skill.to_bytes()
        entry = _entry_of(skill, data, f"{skill.name}.safetensors", tags, note)
        with self._locked():
            manifest = self._read_manifest()
            if _line_number(manifest, skill.name) is not None:
                raise SkillNameError(
                    f"a skill named {skill.name!r} is already in {self.path}; pick another name or remove it first."
                )
            _check_files_free(manifest, skill.name, self.path)
            _check_base(manifest, skill)
            manifest["base_fingerprint"] = skill.metadata.base_fingerprint
            manifest["skills"].append(asdict(entry))
            self._store(entry.file, data, manifest, "add", skill.name)
        return entry

    def replace(self, skill: Skill, *, tags: Sequence[str] | None = None, note: str | None = None) -> SkillEntry:
        """Put ``skill`` in place of the bank's skill of the same name, atomically; returns the new entry.

        The new skill's ``metadata.source["replaces"]`` keeps the earlier versions'
        provenance, newest first (each one's sha256, created, method, sparsity, metrics
        and own source): a flat list of at most :data:`MAX_VERSIONS_KEPT`, the oldest
        dropped, with ``source["versions"]`` counting them all, so the 10,000th
        replacement costs what the second did; ``skill`` itself is not changed. Tags and note carry
        over unless given. The new version is written to its own file
        (``<name>.<sha256[:12]>.safetensors``) and the manifest switched to it in one
        atomic write, so a reader sees the old skill or the new one, never a mix; the old
        file is deleted after. Same checks as :meth:`add`; :class:`SkillNameError` if
        no skill of that name is in the bank.
        """
        _check_storable(skill)
        with self._locked():
            manifest = self._read_manifest()
            number = _line_number(manifest, skill.name)
            if number is None:
                raise SkillNameError(f"no skill named {skill.name!r} in {self.path} to replace; add it instead.")
            old_line = manifest["skills"][number]
            _check_base(manifest, skill)
            record: dict[str, Any] = {k: old_line.get(k) for k in ("sha256", "created", "method", "sparsity", "metrics")}
            try:  # a damaged old version can be replaced too; its manifest line is then all that is kept of it
                old_source = self._load(SkillEntry.from_dict(old_line), manifest["base_fingerprint"]).metadata.source
            except (SkillFileError, BaseMismatchError) as exc:
                old_source, record["unreadable"] = {}, str(exc)[:_MAX_TEXT]
            record["source"] = {k: v for k, v in old_source.items() if k not in ("replaces", "versions")} or None
            earlier, count = _version_chain(old_source)
            source = {**skill.metadata.source, "replaces": [record, *earlier][:MAX_VERSIONS_KEPT], "versions": count + 1}
            metadata = replace(skill.metadata, source=source)
            new = replace(skill, metadata=metadata)
            data = new.to_bytes()
            sha = _sha256(data)
            labels = _checked_labels(
                old_line.get("tags") or [] if tags is None else tags, old_line.get("note", "") if note is None else note
            )
            entry = _entry_of(new, data, f"{skill.name}.{sha[:12]}.safetensors", *labels)
            if entry.file == old_line["file"]:
                raise SkillFileError(f"the new {skill.name!r} is byte for byte the skill in the bank; nothing to replace.")
            if any(line["file"] == entry.file for line in manifest["skills"]):
                raise SkillNameError(
                    f"the new version of {skill.name!r} would be written to {entry.file}, which another skill's line "
                    "names; nothing was written. Rename one of the two skills."
                )
            manifest["skills"][number] = asdict(entry)
            self._store(entry.file, data, manifest, "replace", skill.name)  # the switch: old skill before, new after
            _unlink_regular(self.path / old_line["file"])
            fsync_dir(self.path)
        return entry

    def annotate(
        self, name: str, *, add_tags: Sequence[str] = (), remove_tags: Sequence[str] = (), note: str | None = None
    ) -> SkillEntry:
        """Change skill ``name``'s tags (added in order, duplicates ignored; removed ones need not be there) and,
        unless ``None``, its note; only the manifest is rewritten (atomically). Returns the new entry."""
        check_skill_name(name)
        with self._locked():
            manifest = self._read_manifest()
            number = _line_number(manifest, name)
            if number is None:
                raise self._unknown(name)
            line = manifest["skills"][number]
            removed = set(remove_tags)
            kept = [t for t in line.get("tags") or [] if t not in removed]
            tags = kept + [t for t in dict.fromkeys(add_tags) if t not in kept]
            line["tags"], line["note"] = _checked_labels(tags, line.get("note", "") if note is None else note)
            self._write_manifest(manifest)
        return SkillEntry.from_dict(line)

    def remove(self, name: str) -> None:
        """Remove skill ``name`` (manifest first, then its file).

        On a full disk, where even the shorter manifest cannot be written, the
        skill's file is deleted first to make room, then the manifest written: the
        skill is gone either way (should that write still fail, ``get`` reports its
        file missing until ``remove`` is run again).
        """
        with self._locked():
            manifest = self._read_manifest()
            number = _line_number(manifest, name)
            if number is None:
                raise self._unknown(name)
            # a validated manifest's file: inside the bank, and named by this line alone (files are unique)
            file = self.path / manifest["skills"].pop(number)["file"]
            try:
                self._write_manifest(manifest)
            except OSError as exc:
                if exc.errno not in _NO_SPACE:
                    raise
                _unlink_regular(file)  # frees the room the manifest needs
                fsync_dir(self.path)
                try:
                    self._write_manifest(manifest)
                except OSError as again:
                    if again.errno in _NO_SPACE:
                        raise BankError(
                            f"no space left on the disk of {self.path}, not even to rewrite its manifest after "
                            f"deleting {name!r}'s file; free space elsewhere and run remove again."
                        ) from None
                    raise
                return
            _unlink_regular(file)
            fsync_dir(self.path)

    # -- internals ---------------------------------------------------------

    def _unknown(self, name: str) -> SkillNameError:
        known = self.names()
        return SkillNameError(f"no skill named {name!r} in {self.path}; it holds {known if known else 'no skills yet'}.")

    def _store(self, file: str, data: bytes, manifest: dict[str, Any], verb: str, name: str) -> None:
        """Write ``data`` to ``file``, then ``manifest``: the write that makes it count. A full disk leaves the bank
        as it was (no orphan file) and is a :class:`BankError` that says so (``verb`` skill ``name``)."""
        try:
            atomic_write(self.path / file, data)
            try:
                self._write_manifest(manifest)
            except OSError as exc:
                if exc.errno in _NO_SPACE:  # the old manifest stands: leave no orphan file
                    _unlink_regular(self.path / file)
                raise
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise BankError(
                    f"no space left to {verb} {name!r} ({len(data):,} bytes) in {self.path}; the bank is unchanged. "
                    f"Free space (e.g. skillbank remove an old skill) and {verb} it again."
                ) from None
            raise

    def _initialize(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BankError(f"cannot create a bank at {self.path}: {exc.strerror}.") from exc
        with self._locked():  # under the lock: another process may be creating this bank right now
            if (self.path / _MANIFEST).is_file():
                return
            stray = [p.name for p in self.path.iterdir() if p.name != _LOCK and not _OWN_TMP.fullmatch(p.name)]
            if stray:
                raise BankError(
                    f"{self.path} is not empty and holds no {_MANIFEST}: not a skill bank. "
                    f"Pick an empty or new directory (found e.g. {sorted(stray)[:3]})."
                )
            self._write_manifest(
                {"format": "skillbank", "format_version": MANIFEST_VERSION, "base_fingerprint": None, "skills": []}
            )

    def _current(self) -> _Snapshot:
        """The manifest as last validated, parsed and validated again only when its bytes changed."""
        raw = self._manifest_raw()
        if self._snapshot is None or raw != self._snapshot.raw:
            self._parse_manifest(raw)
        assert self._snapshot is not None
        return self._snapshot

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest, read, validated and parsed anew: a copy a writer may change."""
        return self._parse_manifest(self._manifest_raw())

    def _manifest_raw(self) -> bytes:
        path = self.path / _MANIFEST
        try:
            raw, _ = _read_regular(path, None, MAX_MANIFEST_BYTES, digest=False)
        except FileNotFoundError as exc:
            raise BankError(f"{path} is missing: {self.path} is not (or no longer) a skill bank.") from exc
        except _Unreadable as exc:
            raise BankError(f"{exc}; {self.path} is not a usable skill bank.") from None
        return raw

    def _parse_manifest(self, raw: bytes) -> dict[str, Any]:
        """Parse and validate ``raw`` manifest bytes; refresh the snapshot from them."""
        path = self.path / _MANIFEST
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, an integer of thousands of digits
            raise BankError(f"{path} is damaged (not valid JSON: {str(exc)[:80]}); restore it from a backup.") from None
        version = body.get("format_version") if isinstance(body, dict) else None
        if isinstance(version, int) and version > MANIFEST_VERSION:
            raise BankError(
                f"{path} has format version {version}, newer than this skillbank reads ({MANIFEST_VERSION}); "
                "upgrade skillbank (pip install -U skillbank)."
            )
        # The checksum covers the content; comparing with the canonical bytes catches any other flipped byte.
        if not isinstance(body, dict) or body.get("checksum") != _manifest_checksum(body) or raw != _manifest_bytes(body):
            raise BankError(f"{path} is damaged (its checksum does not match its bytes); restore it from a backup.")
        problem = _manifest_problem(body)
        if problem:
            raise BankError(
                f"{path} is crafted or damaged: {problem}. Nothing was read or changed; "
                "restore the manifest from a backup or get the bank again from its source."
            )
        entries = tuple(SkillEntry.from_dict(e) for e in body["skills"])
        self._snapshot = _Snapshot(raw, body.get("base_fingerprint"), entries, {e.name: e for e in entries})
        return body

    def _write_manifest(self, body: dict[str, Any]) -> None:
        body = {k: v for k, v in body.items() if k != "checksum"}
        body["checksum"] = _manifest_checksum(body)
        atomic_write(self.path / _MANIFEST, _manifest_bytes(body))

    def _load(self, entry: SkillEntry, base: str | None) -> Skill:
        path = self.path / entry.file
        with _skill_file_errors(entry.name, path):
            data, digest = _read_regular(path, entry.bytes, MAX_SKILL_BYTES)
        if digest != entry.sha256:
            raise SkillFileError(
                f"skill {entry.name!r}: {path} fails its sha256 check (corrupted); restore it or remove the skill."
            )
        from skillbank.storage.skill import Skill

        skill = Skill.from_bytes(data, origin=str(path))
        _check_finite_values(skill, f"skill {entry.name!r} in {path}")
        if skill.name != entry.name:
            raise SkillFileError(f"{path} holds skill {skill.name!r}, the manifest expects {entry.name!r}.")
        if base is not None and skill.metadata.base_fingerprint != base:
            raise BaseMismatchError(f"skill {entry.name!r} in {path} was localized on another base model than the bank's.")
        return skill

    @contextmanager
    def _locked(self, clean: bool = True) -> Iterator[None]:
        """Hold the write lock; first (if ``clean``) remove temporary files of crashed writers."""
        if not self.writable:
            raise BankError(
                f"bank {self.path} is read-only; reading works, but to add or remove skills "
                "make the directory writable or copy the bank elsewhere."
            )
        with exclusive_lock(self.path / _LOCK, timeout=self.lock_timeout):
            if clean:
                self._cleanup()
            yield

    def _cleanup(self) -> None:
        """Remove temporary files of crashed writers: regular files named as :func:`atomic_write` names them, only."""
        removed = False
        with os.scandir(self.path) as entries:
            for leftover in entries:
                if _OWN_TMP.fullmatch(leftover.name) and leftover.is_file(follow_symlinks=False):
                    removed = _unlink_regular(Path(leftover.path)) or removed
        if removed:
            fsync_dir(self.path)


class _Unreadable(Exception):
    """A bank file that is not a regular file of the expected size (a link, a FIFO, a device, too large)."""


@contextmanager
def _skill_file_errors(name: str, path: Path) -> Iterator[None]:
    """Within: a missing or unreadable file of skill ``name`` becomes a :class:`SkillFileError` that names both."""
    try:
        yield
    except FileNotFoundError as exc:
        raise SkillFileError(f"skill {name!r}: its file {path} is missing.") from exc
    except _Unreadable as exc:
        raise SkillFileError(f"skill {name!r}: {exc}") from None


@contextmanager
def _open_regular(path: Path, expected: int | None, limit: int) -> Iterator[tuple[int, int]]:
    """``(fd, size)`` of the regular file ``path``: never through a symbolic link, never blocking on a FIFO, and never
    more than ``limit`` bytes or other than ``expected`` bytes (checked before anything is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Unreadable(f"{path} is a symbolic link; a bank's files are never links") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable(f"{path} is not a regular file (a directory, FIFO or device)")
        if expected is not None and info.st_size != expected:
            raise _Unreadable(f"{path} has {info.st_size} bytes, the manifest says {expected} (truncated or damaged)")
        if info.st_size > limit:
            raise _Unreadable(f"{path} has {info.st_size:,} bytes, more than the {limit:,} a bank reads")
        yield fd, info.st_size
    finally:
        os.close(fd)


def _read_regular(path: Path, expected: int | None, limit: int, *, digest: bool = True) -> tuple[bytes, str]:
    """The bytes and sha256 (``""`` unless ``digest``) of the regular file ``path``, opened by :func:`_open_regular`."""
    with _open_regular(path, expected, limit) as (fd, size):
        if expected is not None and size > _CHECK_EXTENT_ABOVE:
            # a large skill file: its header must account for every byte before it is read whole
            _check_safetensors_extent(fd, size, path)
        hasher, chunks, left = hashlib.sha256() if digest else None, [], size
        while left:
            chunk = os.read(fd, min(left, 2**24))
            if not chunk:
                raise _Unreadable(f"{path} shrank while it was read; retry when no other process writes it")
            if hasher is not None:
                hasher.update(chunk)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), hasher.hexdigest() if hasher is not None else ""


_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header
_CHECK_EXTENT_ABOVE = 64 * 2**20  # smaller files are read whole at once; their sha256 says what is wrong


def _safetensors_header(fd: int, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of the ``size``-byte file ``fd`` and its length, read alone (bounded by safetensors' own
    limit); :class:`_Unreadable` when it is not one."""
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 2 <= length <= min(size - 8, _MAX_HEADER):
        raise _Unreadable(f"{path} is not a safetensors file (its header length is impossible)")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (ValueError, RecursionError):
        raise _Unreadable(f"{path} is not a safetensors file (its header is damaged)") from None
    if not isinstance(header, dict):
        raise _Unreadable(f"{path} is not a safetensors file (its header is damaged)")
    return header, length


def _check_safetensors_extent(fd: int, size: int, path: Path) -> None:
    """Raise :class:`_Unreadable` unless the safetensors header read from ``fd`` declares tensors that end exactly at
    ``size``: a crafted or sparse file of any declared size is refused after reading its header alone."""
    header, length = _safetensors_header(fd, size, path)
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise _Unreadable(f"{path} is not a safetensors file (its header is damaged)") from None
    if 8 + length + end != size:
        raise _Unreadable(f"{path} declares {8 + length + end:,} bytes of header and tensors but holds {size:,} (damaged)")


def _unlink_regular(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file (never a link, directory or anything the bank did not write)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _line_number(manifest: dict[str, Any], name: str) -> int | None:
    """Where skill ``name``'s line is in ``manifest["skills"]`` (``None``: not there)."""
    return next((i for i, e in enumerate(manifest["skills"]) if e["name"] == name), None)


def _check_files_free(manifest: dict[str, Any], name: str, bank: Path) -> None:
    """Refuse a new skill ``name`` whose files could be another skill's: its file ``name.safetensors`` and its later
    versions ``name.<12 hex>.safetensors`` must never be a file another line names now or may name after a replace."""
    mine = _VERSIONED.fullmatch(name)
    for line in manifest["skills"]:
        other, theirs = line["name"], _VERSIONED.fullmatch(line["name"])
        if line["file"] == f"{name}.safetensors":
            clash = f"would be stored in {line['file']}, skill {other!r}'s file"
        elif mine and mine.group(1) == other:
            clash = f"is a versioned file name of skill {other!r}"
        elif theirs and theirs.group(1) == name:
            clash = f"is a name whose versions would take skill {other!r}'s file"
        else:
            continue
        raise SkillNameError(
            f"the name {name!r} {clash} in {bank} (a replaced skill's file is <name>.<12 hex>.safetensors); "
            "pick another name. Nothing was written."
        )


def _version_chain(source: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The earlier versions an old version's ``source`` records, newest first (at most :data:`MAX_VERSIONS_KEPT`),
    and how many there were. Reads the flat list this release writes and the nested chain older ones wrote."""
    replaces, count = source.get("replaces"), source.get("versions")
    if isinstance(replaces, list):
        kept = [r for r in replaces if isinstance(r, dict)][:MAX_VERSIONS_KEPT]
        return kept, count if isinstance(count, int) and not isinstance(count, bool) and count >= len(kept) else len(kept)
    chain: list[dict[str, Any]] = []
    count = 0
    while isinstance(replaces, dict):  # the nested form, one level per replace (as deep as a header parses)
        inner: dict[str, Any] = replaces["source"] if isinstance(replaces.get("source"), dict) else {}
        if count < MAX_VERSIONS_KEPT:
            chain.append({**replaces, "source": {k: v for k, v in inner.items() if k != "replaces"} or None})
        count += 1
        replaces = inner.get("replaces")
    return chain, count


def _check_base(manifest: dict[str, Any], skill: Skill) -> None:
    """Refuse ``skill`` if the bank holds skills of another base model."""
    base = manifest["base_fingerprint"]
    if base is not None and base != skill.metadata.base_fingerprint:
        raise BaseMismatchError(
            f"skill {skill.name!r} was localized on another base model (fingerprint "
            f"{skill.metadata.base_fingerprint[:12]}…, bank {base[:12]}…); use a bank for that base."
        )


def _check_finite_values(skill: Skill, what: str) -> None:
    """Raise :class:`SkillFileError` naming the first region of ``skill`` with NaN/Inf values."""
    import torch

    for pname, region in skill.regions.items():
        if not bool(torch.isfinite(region.values).all()):
            raise SkillFileError(f"{what} has NaN/Inf values in {pname!r}; it cannot be stitched. Localize it again.")


def _check_storable(skill: Skill) -> None:
    """Refuse a skill no bank should hold: an unsafe name, NaN/Inf values, an empty mask."""
    check_skill_name(skill.name)
    _check_finite_values(skill, f"skill {skill.name!r}")
    if skill.num_entries == 0:
        raise SkillFileError(f"skill {skill.name!r} has an empty mask (no entries); localize with a larger sparsity.")


def _entry_of(skill: Skill, data: bytes, file: str, tags: list[str], note: str) -> SkillEntry:
    """The manifest line of ``skill``, serialized as ``data`` into ``file``."""
    meta = skill.metadata
    return SkillEntry(
        name=skill.name,
        file=file,
        bytes=len(data),
        sha256=_sha256(data),
        task=meta.task,
        method=meta.method,
        sparsity=meta.sparsity,
        entries=skill.num_entries,
        shared=skill.num_shared,
        value_dtype=meta.value_dtype,
        created=meta.created,
        metrics=dict(meta.metrics),
        tags=tags,
        note=note,
    )


def _checked_labels(tags: Sequence[str], note: str) -> tuple[list[str], str]:
    """``tags`` (a list) and ``note`` if a manifest may hold them, else a :class:`SkillNameError` that says the rule."""
    if isinstance(tags, str):
        raise SkillNameError(f"tags must be a list of tags, not the string {tags!r}.")
    tags = list(tags)
    bad = [t for t in tags if not (isinstance(t, str) and _TAG.fullmatch(t))]
    if bad or len(tags) > MAX_TAGS:
        raise SkillNameError(
            f"invalid tags {bad[:3] or tags[:3]}: at most {MAX_TAGS} tags, each 1-64 letters, digits or '._:+-', "
            "starting with a letter or digit."
        )
    if not isinstance(note, str) or len(note) > _MAX_TEXT:
        raise SkillNameError(f"a note must be text of at most {_MAX_TEXT} characters.")
    return tags, note


def _manifest_problem(body: dict[str, Any]) -> str:
    """What is wrong with a manifest's structure ("" if nothing): every entry's name, file, size, hash and types."""
    base = body.get("base_fingerprint")
    if base is not None and not isinstance(base, str):
        return "base_fingerprint is not a string"
    skills = body.get("skills")
    if not isinstance(skills, list):
        return "'skills' is not a list"
    seen: set[str] = set()
    files: set[str] = set()
    for number, entry in enumerate(skills, 1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        for key, kind in _REQUIRED.items():
            if key not in entry:
                return f"{where} has no {key!r}"
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                return f"{where}: {key!r} is not a {kind.__name__}"
        name = entry["name"]
        if not _NAME.fullmatch(name):
            return f"{where}: {name[:80]!r} is not a valid skill name"
        if not re.fullmatch(re.escape(name) + r"(\.[0-9a-f]{12})?\.safetensors", entry["file"]):
            return f"{where} ({name}): its file must be {name}.safetensors (or {name}.<12 hex>.safetensors), not {entry['file'][:80]!r}"
        if name in seen:
            return f"{where}: the name {name!r} appears twice"
        if entry["file"] in files:
            return f"{where} ({name}): its file {entry['file']!r} is another entry's too"
        seen.add(name)
        files.add(entry["file"])
        if not 0 <= entry["bytes"] <= MAX_SKILL_BYTES or not _SHA256.fullmatch(entry["sha256"]):
            return f"{where} ({name}): a size outside 0-{MAX_SKILL_BYTES:,} bytes or a malformed sha256"
        for key, kinds in _SUMMARY.items():
            value = entry.get(key)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                return f"{where} ({name}): {key!r} has the wrong type"
            if isinstance(value, str) and len(value) > _MAX_TEXT:
                return f"{where} ({name}): {key!r} is longer than {_MAX_TEXT} characters"
            if isinstance(value, int) and not -_MAX_INT <= value <= _MAX_INT:
                return f"{where} ({name}): {key!r} is an integer beyond 2**53"
        metrics = entry.get("metrics") or {}
        if len(metrics) > 256 or not all(
            isinstance(k, str)
            and len(k) <= 256
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and (isinstance(v, float) or -_MAX_INT <= v <= _MAX_INT)
            for k, v in metrics.items()
        ):
            return f"{where} ({name}): 'metrics' must map at most 256 short names to numbers"
        tags = entry.get("tags") or []
        if len(tags) > MAX_TAGS or not all(isinstance(t, str) and _TAG.fullmatch(t) for t in tags):
            return f"{where} ({name}): 'tags' must be at most {MAX_TAGS} tags of letters, digits and ._:+-"
    return ""
