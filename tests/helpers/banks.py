"""Banks as an attacker leaves them: a manifest rewritten with a valid checksum, a skill file swapped under it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skillbank import SkillBank
from skillbank.storage.bank import _manifest_bytes, _manifest_checksum


def craft(bank_dir: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to the manifest's body and write it back with a valid checksum, as an attacker can."""
    path = bank_dir / "manifest.json"
    body = json.loads(path.read_text())
    edit(body)
    body.pop("checksum", None)
    body["checksum"] = _manifest_checksum(body)
    path.write_bytes(_manifest_bytes(body))


def swap_skill_file(bank: SkillBank, name: str, data: bytes) -> None:
    """Put ``data`` in skill ``name``'s file and make its manifest line match it (size and sha256)."""
    (bank.path / bank.entry(name).file).write_bytes(data)
    number = bank.names().index(name)
    craft(bank.path, lambda body: body["skills"][number].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
