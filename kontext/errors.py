"""The one base of every error a user can fix: a config key, a file, a folder, a model reference, an option.

Every user-facing error of the project derives from :class:`UserError` (``data``, ``kontext.runtime``,
``kontext.training`` and the commands alike), so the entry points catch it once and print its message, which names
the file or key and says how to fix it, without a traceback. This module imports nothing of the project: every
layer may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input or environment that ends the command with one clear message (no traceback)."""
