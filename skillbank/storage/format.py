"""Facts of the on-disk format that need no torch: the format version and the value dtypes a skill may use.

Kept apart so that reading a bank's manifest (``skillbank list``, ``--help``)
imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["FORMAT_VERSION", "MANIFEST_VERSION", "VALUE_CODE_BITS", "VALUE_DTYPE_NAMES", "VALUE_FORMATS"]

#: The newest skill file layout this release reads and writes (2: a skill may keep a few examples and low-rank
#: parts; 3: values coded in a few bits, positions in Elias–Fano or a bitmap). Each file is written at the oldest
#: version that holds it, so a skill with float values and neither examples nor low-rank parts stays at 1.
FORMAT_VERSION = 3
#: The bank manifest's layout (unchanged since 1; written by this release, the newest it reads).
MANIFEST_VERSION = 1
#: Names of the dtypes a skill may store its task-vector entries in.
VALUE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Values coded in a few bits each (sign and magnitude bin, see :mod:`skillbank.storage.value_codes`): name -> bits.
VALUE_CODE_BITS = {"1bit": 1, "2bit": 2, "4bit": 4}
#: Every way a skill may store its values: a float dtype or a code.
VALUE_FORMATS = VALUE_DTYPE_NAMES + tuple(VALUE_CODE_BITS)
