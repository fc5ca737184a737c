"""Facts of the on-disk format that need no torch: the format version and the value dtypes a skill may use.

Kept apart so that reading a bank's manifest (``skillbank list``, ``--help``)
imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "VALUE_DTYPE_NAMES"]

#: Version of the skill file and manifest layout this release writes and reads.
FORMAT_VERSION = 1
#: Names of the dtypes a skill may store its task-vector entries in.
VALUE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
