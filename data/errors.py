"""The one exception type for problems in a user's dataset.

Every check in ``data`` that finds something wrong with the user's files raises
:class:`DatasetError`, carrying *all* problems found so that one run lists everything to fix.
"""

from __future__ import annotations

from collections.abc import Sequence


class DatasetError(ValueError):
    """A dataset cannot be used as it is.

    ``DatasetError(where, problems)``: ``where`` names the dataset (``source.describe()``), ``problems``
    holds one line per problem, each naming the file (or row and column) and the fix. ``str(err)`` lists
    them all under a one-line summary naming the dataset.
    """

    def __init__(self, where: str, problems: Sequence[str]) -> None:
        if isinstance(problems, str):
            raise TypeError("DatasetError problems must be a list of lines, not one string")
        self.where = where
        self.problems = list(problems)
        n = len(self.problems)
        head = f"Dataset {where} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:
        # BaseException pickles as cls(*args) with args = (message,); rebuild from the fields instead.
        return (type(self), (self.where, self.problems))
