"""The folder source: ``context/``, ``target/``, ``mask/`` and ``prompts/`` (or ``metadata.jsonl``) under one root.

Opening a :class:`FolderSource` lists the folders once and records every structural problem
(missing folders, a sample missing a counterpart, non-image files, links leaving the folder,
unreadable or malformed prompts and metadata lines) in :meth:`~FolderSource.scan_problems`;
nothing is decoded until a sample is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError, first_names
from ..images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageRef
from .base import ROLES, _inside, _SourceBase, _unresolvable

PROMPT_MODES = ("auto", "files", "metadata", "default")
# Hidden files a file browser or notebook leaves in any folder: skipped without a word.
BROWSER_FILES = frozenset({".DS_Store", ".ipynb_checkpoints", ".localized", ".directory"})


@dataclass
class _FolderEntry:
    name: str
    files: dict[str, Path]
    prompt: str | None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class FolderSource(_SourceBase):
    """A dataset folder: ``context/NAME.ext``, ``target/NAME.ext``, ``mask/NAME.ext`` and prompts.

    Prompts (``prompts``): ``"auto"`` takes, per sample, the ``metadata.jsonl`` prompt if the
    sample has a line there, else ``prompts/NAME.txt``, else ``default_prompt``; ``"metadata"``,
    ``"files"`` and ``"default"`` use only that one origin. Every file the source reads must
    resolve (symlinks included) inside ``root``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        default_prompt: str | None = None,
        prompts: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if prompts not in PROMPT_MODES:
            raise ValueError(f"data.prompts must be one of {PROMPT_MODES}, got {prompts!r}")
        self.root = Path(root).expanduser().absolute()
        self.default_prompt = default_prompt
        self.prompts_mode = prompts
        self.max_pixels = max_pixels
        self._entries: list[_FolderEntry] = []
        # Samples whose prompt is ``default_prompt`` although some other sample has its own (see validate_source).
        self.defaulted_prompts: list[str] = []
        self._scan()

    def describe(self) -> str:
        """``folder <absolute path>``."""
        return f"folder {self.root}"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        """Names of the complete samples, sorted."""
        return [e.name for e in self._entries]

    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """The three files of sample ``i``, labelled by their path relative to the folder."""
        e = self._entries[i]
        return {r: ImageRef(_rel(e.files[r], self.root), path=e.files[r]) for r in ROLES}

    def prompt(self, i: int) -> str:
        """Prompt of sample ``i`` (metadata.jsonl, prompts/NAME.txt or the default, see the class)."""
        p = self._entries[i].prompt
        if p is None:
            raise DatasetError(self.describe(), [self._no_prompt_message(self._entries[i].name)])
        return p

    # -- scanning

    def _no_prompt_message(self, name: str) -> str:
        return (
            f"sample '{name}' has no prompt; write prompts/{name}.txt, add a metadata.jsonl line for it, "
            "or set data.default_prompt"
        )

    def _walk(
        self, sub: str, rejected: set[str] | None = None, hidden: list[str] | None = None
    ) -> Iterator[Path]:
        """The entries of the existing folder ``sub/`` that can be followed, in name order.

        Shared by the image folders and ``prompts/``: hidden files (``.DS_Store``) are skipped, their names going
        into ``hidden`` when it is given (a file browser's own files excepted); a
        folder that cannot be listed, and each entry that cannot be followed (a symlink loop, an
        unreadable link), is reported here as it is met, so problems keep the folder's order. The
        stems of entries that cannot be followed go into ``rejected`` when it is given.
        """
        try:
            entries = sorted((self.root / sub).iterdir())
        except (OSError, RuntimeError) as err:
            self._problems.append(
                f"folder {sub}/ cannot be listed ({getattr(err, 'strerror', None) or err}); check that it is a readable folder"
            )
            return
        for p in entries:
            if p.name.startswith("."):
                if hidden is not None and p.name not in BROWSER_FILES:
                    hidden.append(p.name)
                continue  # .DS_Store and friends
            why = _unresolvable(p)
            if why is not None:
                self._problems.append(f"{sub}/{p.name} {why}")
                if rejected is not None:
                    rejected.add(p.stem)
                continue
            yield p

    def _list_role(self, role: str, root_resolved: Path) -> dict[str, Path]:
        folder = self.root / role
        found: dict[str, Path] = {}
        if not folder.is_dir():
            self._problems.append(
                f"folder {role}/ is missing in {self.root}; create it with one image per sample ({role}/NAME.png)"
            )
            return found
        # A file that cannot be followed is reported by _walk; not again as a missing counterpart.
        hidden: list[str] = []
        for p in self._walk(role, rejected=self._rejected, hidden=hidden):
            if p.is_dir():
                self._problems.append(f"{role}/{p.name}/ is a folder; {role}/ must hold image files only, move it out")
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                self._problems.append(
                    f"{role}/{p.name} is not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)}); remove it or convert it to PNG"
                )
                continue
            if not _inside(p, root_resolved):
                self._problems.append(
                    f"{role}/{p.name} links outside the dataset folder ({p.resolve()}); copy the file into the folder"
                )
                self._rejected.add(p.stem)  # reported here; not again as a missing counterpart
                continue
            if p.stem in found:
                self._problems.append(
                    f"{role}/ has two files for sample '{p.stem}' ({found[p.stem].name} and {p.name}); keep one"
                )
                continue
            found[p.stem] = p
        if hidden and not found:
            shown = first_names([f"{role}/{n}" for n in hidden], 3)
            self._problems.append(
                f"{role}/ holds only hidden files ({shown}): names beginning with '.' are ignored as hidden; rename "
                f"them without the leading dot ({role}/NAME.png)"
            )
        return found

    def _read_prompt_files(self, root_resolved: Path) -> dict[str, str]:
        folder = self.root / "prompts"
        out: dict[str, str] = {}
        if not folder.is_dir():
            return out
        for p in self._walk("prompts"):
            if p.is_dir():
                continue
            if p.suffix.lower() != ".txt":
                self._problems.append(f"prompts/{p.name} is not a .txt file; prompts are prompts/NAME.txt, rename or remove it")
                continue
            if not _inside(p, root_resolved):
                self._problems.append(f"prompts/{p.name} links outside the dataset folder; copy the file into the folder")
                continue
            try:
                text = p.read_text(encoding="utf-8-sig").strip()  # utf-8-sig: a byte-order mark is not part of the prompt
            except UnicodeDecodeError:
                self._problems.append(f"prompts/{p.name} is not UTF-8 text; save it as UTF-8")
                continue
            except (OSError, RuntimeError) as err:
                self._problems.append(f"prompts/{p.name} cannot be read ({getattr(err, 'strerror', None) or err}); make it readable")
                continue
            if not text:
                self._problems.append(
                    f"prompts/{p.name} is empty; write the instruction in it, or delete it to use data.default_prompt"
                )
                continue
            out[p.stem] = text
        return out

    def _metadata_path(self, value: Any, key: str, lineno: int, root_resolved: Path) -> Path | None:
        where = f"metadata.jsonl line {lineno}"
        if not isinstance(value, str) or not value:
            self._problems.append(f"{where}: '{key}' must be a path string relative to the dataset folder")
            return None
        p = Path(value)
        p = p if p.is_absolute() else self.root / p
        why = _unresolvable(p)
        if why is not None:
            self._problems.append(f"{where}: '{key}' file {value!r} {why}")
            return None
        if not _inside(p, root_resolved):
            self._problems.append(
                f"{where}: '{key}' path {value!r} resolves outside the dataset folder {self.root}; "
                "put the file inside the folder and give its path relative to it"
            )
            return None
        if not p.is_file():
            self._problems.append(f"{where}: '{key}' file {value!r} does not exist; fix the path or add the file")
            return None
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            self._problems.append(
                f"{where}: '{key}' file {value!r} is not an image file (allowed: {', '.join(IMAGE_EXTENSIONS)}); convert it to PNG"
            )
            return None
        return p

    def _read_metadata(
        self, root_resolved: Path
    ) -> tuple[dict[str, str | None], dict[str, dict[str, Path]], set[str], dict[str, int]]:
        """Parse metadata.jsonl: prompts, explicit files, names whose explicit paths failed, line numbers."""
        path = self.root / "metadata.jsonl"
        prompts: dict[str, str | None] = {}
        files: dict[str, dict[str, Path]] = {}
        broken: set[str] = set()
        seen: dict[str, int] = {}
        why = _unresolvable(path) if path.is_symlink() else None
        if why is not None:
            self._problems.append(f"metadata.jsonl {why}")
            return prompts, files, broken, seen
        if not path.is_file():
            return prompts, files, broken, seen
        if not _inside(path, root_resolved):
            self._problems.append("metadata.jsonl links outside the dataset folder; copy the file into the folder")
            return prompts, files, broken, seen
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            self._problems.append("metadata.jsonl is not UTF-8 text; save it as UTF-8")
            return prompts, files, broken, seen
        except (OSError, RuntimeError) as err:
            self._problems.append(f"metadata.jsonl cannot be read ({getattr(err, 'strerror', None) or err}); make it readable")
            return prompts, files, broken, seen
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"metadata.jsonl line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                self._problems.append(f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix or delete the line")
                continue
            if not isinstance(rec, dict):
                self._problems.append(f"{where}: must be a JSON object like {{\"name\": \"a\", \"prompt\": \"...\"}}")
                continue
            raw_name = rec.get("name", rec.get("file_name"))
            if not isinstance(raw_name, str) or not raw_name.strip():
                self._problems.append(f"{where}: needs a \"name\" (or \"file_name\") string naming the sample")
                continue
            name = Path(raw_name).name
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                name = Path(name).stem
            if name in seen:
                self._problems.append(f"{where}: sample '{name}' is already listed on line {seen[name]}; keep one line per sample")
                continue
            seen[name] = lineno
            unknown = sorted(set(rec) - {"name", "file_name", "prompt", *ROLES})
            if unknown:
                self._problems.append(
                    f"{where}: unknown keys {unknown}; allowed keys are name, file_name, prompt, context, target, mask"
                )
            prompt = rec.get("prompt")
            if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
                self._problems.append(f"{where}: \"prompt\" must be a non-empty string")
                prompt = None
            prompts[name] = prompt.strip() if isinstance(prompt, str) else None
            explicit = {}
            for role in ROLES:
                if role in rec:
                    p = self._metadata_path(rec[role], role, lineno, root_resolved)
                    if p is None:
                        broken.add(name)
                    else:
                        explicit[role] = p
            if explicit:
                files[name] = explicit
        return prompts, files, broken, seen

    def _scan(self) -> None:
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            self._problems.append(
                f"dataset folder {self.root} {what}; set data.root to a folder holding context/, target/ and mask/"
            )
            return
        root_resolved = self.root.resolve()
        self._rejected: set[str] = set()
        by_role = {r: self._list_role(r, root_resolved) for r in ROLES}
        missing_folders = {r for r in ROLES if not (self.root / r).is_dir()}
        use_meta = self.prompts_mode in ("auto", "metadata")
        use_files = self.prompts_mode in ("auto", "files")
        # Explicit metadata paths count as files; a sample whose explicit path failed is reported once.
        meta_prompts, meta_files, broken, meta_lines = self._read_metadata(root_resolved)
        file_prompts = self._read_prompt_files(root_resolved) if use_files else {}
        names = sorted(set().union(*by_role.values(), meta_files, meta_prompts))
        no_prompt: list[str] = []
        defaulted: list[str] = []
        for name in names:
            if name in broken or name in self._rejected:
                continue
            files = {r: meta_files.get(name, {}).get(r, by_role[r].get(name)) for r in ROLES}
            have = [r for r in ROLES if files[r] is not None]
            if len(have) < 3:
                missing = [r for r in ROLES if files[r] is None]
                if all(r in missing_folders for r in missing):
                    continue  # the missing folder is reported once, not once per sample
                if not have:
                    self._problems.append(
                        f"metadata.jsonl line {meta_lines.get(name, '?')}: sample '{name}' has no context, target or mask file; "
                        f"add context/{name}.png, target/{name}.png and mask/{name}.png or remove the line"
                    )
                else:
                    got = ", ".join(_rel(files[r], self.root) for r in have)  # type: ignore[arg-type]
                    want = " and ".join(f"{r}/{name}.png" for r in missing)
                    self._problems.append(f"sample '{name}': has {got} but no {' or '.join(missing)}; add {want} or remove {got}")
                continue
            prompt: str | None = None
            if use_meta and meta_prompts.get(name):
                prompt = meta_prompts[name]
            elif use_files and name in file_prompts:
                prompt = file_prompts[name]
            elif self.default_prompt:
                prompt = self.default_prompt
                defaulted.append(name)
            if prompt is None:
                no_prompt.append(name)
            self._entries.append(_FolderEntry(name, files, prompt))  # type: ignore[arg-type]
        if len(defaulted) < len(self._entries):
            self.defaulted_prompts = defaulted
        if len(no_prompt) == 1:
            self._problems.append(self._no_prompt_message(no_prompt[0]))
        elif no_prompt:
            shown = first_names([f"'{n}'" for n in no_prompt], 5)
            self._problems.append(
                f"{len(no_prompt)} samples have no prompt ({shown}); write prompts/NAME.txt files, metadata.jsonl "
                "lines, or set data.default_prompt"
            )
        known = {e.name for e in self._entries} | set(names)
        for stem in sorted(set(file_prompts) - known):
            self._problems.append(f"prompts/{stem}.txt matches no sample; rename it to the sample's name or remove it")
        if not names and not self._problems:
            self._problems.append(
                f"dataset folder {self.root} is empty: context/, target/ and mask/ hold no images; add samples "
                "(context/NAME.png, target/NAME.png, mask/NAME.png)"
            )
