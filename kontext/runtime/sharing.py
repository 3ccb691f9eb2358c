"""What makes an exported file fit to share: readable by others (the umask), and free of local paths.

``safetensors`` writes to a temporary file and renames it, so a fresh export is mode 0600 whatever the
umask; a ComfyUI running as another user or in a container then cannot read it. :func:`respect_umask`
gives it the mode an ordinary ``open(..., "w")`` would have. :func:`shareable_model_name` is what the
files' metadata and the model card record as the base model: a hub id, never a folder under a home.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A hub download's cache folder: .../models--<org>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")


def current_umask() -> int:
    """The process umask (read from /proc on Linux, so no other thread sees a changed umask meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> Path:
    """Give the regular file ``path`` mode ``0o666 & ~umask`` (what ``open(path, "w")`` would create)."""
    path = Path(path)
    os.chmod(path, 0o666 & ~current_umask())
    return path


def shareable_model_name(name_or_path: str) -> str:
    """The base model as a file meant for others records it.

    A hub id stays as it is; a folder in the Hugging Face cache (``.../models--org--name/snapshots/<rev>``)
    becomes its hub id ``org/name``; any other local folder becomes its folder name only.
    """
    s = str(name_or_path)
    m = _HUB_CACHE.search(s.replace("\\", "/") + "/")
    if m:
        return f"{m['org']}/{m['name']}"
    if os.path.isabs(s) or Path(s).expanduser().exists() or s.startswith(("~", ".")):
        return Path(s).expanduser().resolve().name or s
    return s
