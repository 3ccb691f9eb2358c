"""The one exception type for problems in a user's dataset.

Every check in ``data`` that finds something wrong with the user's files raises
:class:`DatasetError`, carrying *all* problems found so that one run lists everything to fix.
"""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be used as it is.

    ``problems`` holds one line per problem, each naming the file (or row and column) and the fix;
    ``str(err)`` lists them all under a one-line summary naming the dataset (``where``).
    ``DatasetError(message)`` with a single string is also accepted (how DataLoader workers
    re-raise exceptions in the main process).
    """

    def __init__(self, where: str, problems: list[str] | None = None) -> None:
        self.where = where
        self.problems = list(problems) if problems is not None else []
        if problems is None:
            super().__init__(where)
            return
        n = len(self.problems)
        head = f"Dataset {where} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type, tuple[str, list[str] | None]]:
        return (type(self), (self.where, self.problems if self.problems else None))
