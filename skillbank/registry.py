"""``Registry``: things of one kind known by name (overlap rules, localization methods, merges), one shape for all.

>>> colours = Registry("colour")
>>> colours.add("red", 1)
1
>>> colours["blue"]
Traceback (most recent call last):
...
skillbank.errors.SkillbankError: unknown colour 'blue'; known: red.
"""

from __future__ import annotations

from typing import TypeVar

from skillbank.errors import SkillbankError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T]):
    """A ``dict`` by name whose unknown names and taken names are errors that say what to do.

    Args:
        kind: what the things are, for the messages (``"overlap rule"``).
        error: the error an unknown name raises (a :class:`SkillbankError`).
    """

    def __init__(self, kind: str, error: type[SkillbankError] = SkillbankError) -> None:
        super().__init__()
        self.kind, self.error = kind, error

    def add(self, name: str, item: T) -> T:
        """Make ``item`` known as ``name``; a taken name is an error (nothing is replaced)."""
        if name in self:
            article = "an" if self.kind[:1] in "aeiou" else "a"
            raise SkillbankError(f"{article} {self.kind} named {name!r} is registered already; give the new one another name.")
        self[name] = item
        return item

    def __missing__(self, name: str) -> T:
        raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}.")
