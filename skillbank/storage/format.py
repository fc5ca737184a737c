"""Facts of the on-disk format that need no torch: the format version and the value dtypes a skill may use.

Kept apart so that reading a bank's manifest (``skillbank list``, ``--help``)
imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "MANIFEST_VERSION", "VALUE_DTYPE_NAMES"]

#: The newest skill file layout this release reads and writes (2: a skill may keep a few examples and low-rank
#: parts). Each file is written at the oldest version that holds it, so a skill without either stays at 1.
FORMAT_VERSION = 2
#: The bank manifest's layout (unchanged since 1; written by this release, the newest it reads).
MANIFEST_VERSION = 1
#: Names of the dtypes a skill may store its task-vector entries in.
VALUE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
