"""Where triplets come from: a dataset folder or a Hugging Face dataset.

Both sources answer the same questions: how many samples, their names, the image references of
sample ``i`` (for validation), its prompt, its size, a content fingerprint (for cache keys), and
``load(i)`` which decodes it into a :class:`RawSample`. Constructing a source never raises for
problems in the user's data; it records them and :func:`data.validate.validate_source` reports
them all together.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .errors import DatasetError
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageProblem,
    ImageRef,
    decode_mask,
    _is_loop,
    decode_rgb,
    open_header,
    oriented_size,
)

ROLES = ("context", "target", "mask")
PROMPT_MODES = ("auto", "files", "metadata", "default")


@dataclass
class RawSample:
    """One decoded triplet at its original size.

    context, target: RGB images; mask: ``L`` image, white (>= 128) where the object goes.
    All three have the same size (validation guarantees it).
    """

    name: str
    context: Image.Image
    target: Image.Image
    mask: Image.Image
    prompt: str


class TripletSource(Protocol):
    """What the rest of ``data`` needs from a source."""

    max_pixels: int

    def __len__(self) -> int: ...

    @property
    def names(self) -> list[str]:
        """Sample names, index-aligned."""

    def describe(self) -> str:
        """What the source is, for messages (folder path or dataset id and split)."""

    def scan_problems(self) -> list[str]:
        """Structural problems found when the source was opened."""

    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """``{"context", "target", "mask"}`` references of sample ``i`` (nothing opened)."""

    def prompt(self, i: int) -> str:
        """The prompt of sample ``i``."""

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i``."""

    def fingerprint(self, i: int) -> str:
        """Content hash of sample ``i``'s images."""

    def load(self, i: int) -> RawSample:
        """Decoded sample ``i``."""


def _hash_refs(refs: dict[str, ImageRef]) -> str:
    h = hashlib.sha256()
    for role in ROLES:
        data = refs[role].read_bytes()
        h.update(role.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _SourceBase(ABC):
    """Shared loading, size and fingerprint logic over ``image_refs``."""

    max_pixels: int

    def __init__(self) -> None:
        self._fingerprints: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

    @abstractmethod
    def describe(self) -> str:
        """What the source is, for messages."""

    @abstractmethod
    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """The three image references of sample ``i``."""

    @abstractmethod
    def prompt(self, i: int) -> str:
        """The prompt of sample ``i``."""

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """Sample names, index-aligned."""

    def _fail(self, label: str, problem: ImageProblem | str) -> DatasetError:
        return DatasetError(self.describe(), [f"{label}: {problem}"])

    def fingerprint(self, i: int) -> str:
        """SHA-256 over the encoded bytes of context, target and mask (prompt excluded: cached separately)."""
        if i not in self._fingerprints:
            refs = self.image_refs(i)
            try:
                self._fingerprints[i] = _hash_refs(refs)
            except ImageProblem as err:
                raise self._fail(self.names[i], err) from err
        return self._fingerprints[i]

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i`` as displayed (EXIF orientation applied), from the target's header."""
        if i not in self._sizes:
            ref = self.image_refs(i)["target"]
            try:
                with open_header(ref, self.max_pixels) as img:
                    self._sizes[i] = oriented_size(img)
            except ImageProblem as err:
                raise self._fail(ref.label, err) from err
        return self._sizes[i]

    def load(self, i: int) -> RawSample:
        """Decode sample ``i``: context and target as RGB, the mask as ``L`` (same rules as validation)."""
        refs = self.image_refs(i)
        out: dict[str, Image.Image] = {}
        for role in ROLES:
            ref = refs[role]
            try:
                img = open_header(ref, self.max_pixels)
                out[role] = decode_mask(img) if role == "mask" else decode_rgb(img)
            except ImageProblem as err:
                raise self._fail(ref.label, err) from err
        sizes = {r: out[r].size for r in ROLES}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{refs[r].label} is {w}x{h}" for r, (w, h) in sizes.items())
            raise DatasetError(self.describe(), [f"sizes differ: {detail}; resize them to the same size"])
        return RawSample(self.names[i], out["context"], out["target"], out["mask"], self.prompt(i))


# ---------------------------------------------------------------- folder


@dataclass
class _FolderEntry:
    name: str
    files: dict[str, Path]
    prompt: str | None


def _inside(path: Path, root_resolved: Path) -> bool:
    try:
        path.resolve().relative_to(root_resolved)
        return True
    except (ValueError, OSError, RuntimeError):  # unresolvable paths are reported by _unresolvable first
        return False


def _unresolvable(path: Path) -> str | None:
    """Why ``path`` cannot be followed (a symlink loop, an unreadable link), or None if it can be resolved."""
    try:
        path.resolve()
        os.stat(path)  # follows the link: ELOOP / EACCES surface here
    except FileNotFoundError:
        return None  # a missing or dangling file is reported where it is opened ("does not exist")
    except (OSError, RuntimeError) as err:
        if _is_loop(err):
            return "is a symlink loop (the link points back at itself); replace it with the file or remove it"
        return f"cannot be read ({getattr(err, 'strerror', None) or err}); check that it exists and is readable"
    return None


def _listdir(folder: Path) -> list[Path] | str:
    """The sorted entries of ``folder``, or why it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except (OSError, RuntimeError) as err:
        return f"cannot be listed ({getattr(err, 'strerror', None) or err}); check that it is a readable folder"


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
        self._problems: list[str] = []
        self._entries: list[_FolderEntry] = []
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

    def scan_problems(self) -> list[str]:
        """Problems found while listing the folder (missing folders, counterparts, prompts, metadata)."""
        return list(self._problems)

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

    def _list_role(self, role: str, root_resolved: Path) -> dict[str, Path]:
        folder = self.root / role
        found: dict[str, Path] = {}
        if not folder.is_dir():
            self._problems.append(
                f"folder {role}/ is missing in {self.root}; create it with one image per sample ({role}/NAME.png)"
            )
            return found
        entries = _listdir(folder)
        if isinstance(entries, str):
            self._problems.append(f"folder {role}/ {entries}")
            return found
        for p in entries:
            if p.name.startswith("."):
                continue  # .DS_Store and friends
            why = _unresolvable(p)
            if why is not None:
                self._problems.append(f"{role}/{p.name} {why}")
                self._rejected.add(p.stem)  # reported here; not again as a missing counterpart
                continue
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
        return found

    def _read_prompt_files(self, root_resolved: Path) -> dict[str, str]:
        folder = self.root / "prompts"
        out: dict[str, str] = {}
        if not folder.is_dir():
            return out
        entries = _listdir(folder)
        if isinstance(entries, str):
            self._problems.append(f"folder prompts/ {entries}")
            return out
        for p in entries:
            if p.name.startswith("."):
                continue
            why = _unresolvable(p)
            if why is not None:
                self._problems.append(f"prompts/{p.name} {why}")
                continue
            if p.is_dir():
                continue
            if p.suffix.lower() != ".txt":
                self._problems.append(f"prompts/{p.name} is not a .txt file; prompts are prompts/NAME.txt, rename or remove it")
                continue
            if not _inside(p, root_resolved):
                self._problems.append(f"prompts/{p.name} links outside the dataset folder; copy the file into the folder")
                continue
            try:
                text = p.read_text(encoding="utf-8").strip()
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
            lines = path.read_text(encoding="utf-8").splitlines()
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
            if prompt is None:
                no_prompt.append(name)
            self._entries.append(_FolderEntry(name, files, prompt))  # type: ignore[arg-type]
        if len(no_prompt) == 1:
            self._problems.append(self._no_prompt_message(no_prompt[0]))
        elif no_prompt:
            shown = ", ".join(f"'{n}'" for n in no_prompt[:5]) + (f" and {len(no_prompt) - 5} more" if len(no_prompt) > 5 else "")
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


# ---------------------------------------------------------------- Hugging Face datasets


_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


class HFSource(_SourceBase):
    """A Hugging Face dataset with context/target/mask image columns and a prompt column.

    ``name_or_path``: a hub id, a local folder (anything ``datasets.load_dataset`` reads, or a
    ``save_to_disk`` folder, read with ``datasets.load_from_disk``), or a single
    .parquet/.jsonl/.csv/.arrow file. Image columns are ``datasets.Image`` features or path
    strings; path strings are allowed only for local datasets and must stay inside its folder.
    A ``name`` column, if present, names the samples in messages. Code from the hub is never run.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        split: str = "train",
        context_column: str = "context",
        target_column: str = "target",
        mask_column: str = "mask",
        prompt_column: str | None = "prompt",
        default_prompt: str | None = None,
        name_column: str = "name",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path)
        self.split = split
        self.columns = {"context": context_column, "target": target_column, "mask": mask_column}
        self.prompt_column = prompt_column
        self.default_prompt = default_prompt
        self.max_pixels = max_pixels
        self._problems: list[str] = []
        self._ds: Any = None
        self._kind: dict[str, str] = {}
        self._base: Path | None = None
        self._names: list[str] = []
        self._prompts: list[str | None] = []
        self._load_dataset()

    def describe(self) -> str:
        """``'<name or path>' (split '<split>')``."""
        return f"'{self.name_or_path}' (split '{self.split}')"

    def __len__(self) -> int:
        return 0 if self._ds is None else len(self._ds)

    @property
    def names(self) -> list[str]:
        """The ``name`` column if the dataset has one, else ``row N``."""
        return self._names

    def scan_problems(self) -> list[str]:
        """Problems found while loading the dataset and checking its columns."""
        return list(self._problems)

    def _open(self) -> Any:
        import datasets

        local = Path(self.name_or_path).expanduser()
        if local.is_dir():
            self._base = local.resolve()
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise KeyError(f"split '{self.split}' not found (available: {sorted(ds)}); set data.split")
                    ds = ds[self.split]
                return ds
            return datasets.load_dataset(str(local), split=self.split)
        if local.is_file():
            self._base = local.resolve().parent
            builder = _FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"cannot read {local.suffix} files; use .parquet, .jsonl, .csv or .arrow")
            return datasets.load_dataset(builder, data_files={self.split: str(local)}, split=self.split)
        return datasets.load_dataset(self.name_or_path, split=self.split)

    def _load_dataset(self) -> None:
        import datasets

        try:
            ds = self._open()
        except Exception as err:  # noqa: BLE001 - any loading failure is reported with the fix
            self._problems.append(
                f"could not load the Hugging Face dataset {self.describe()}: {type(err).__name__}: {err}; "
                "check data.root (hub id or local folder) and data.split"
            )
            return
        cols = set(ds.column_names)
        wanted = dict(self.columns)
        for role, col in wanted.items():
            if col not in cols:
                self._problems.append(
                    f"column '{col}' (the {role} image) is not in the dataset (columns: {sorted(cols)}); "
                    f"set data.{role}_column to the right column"
                )
                continue
            feature = ds.features[col]
            if isinstance(feature, datasets.Image):
                self._kind[role] = "image"
                ds = ds.cast_column(col, datasets.Image(decode=False))
            elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                self._kind[role] = "path"
                if self._base is None:
                    self._problems.append(
                        f"column '{col}' holds file paths, which only local datasets may use; "
                        "store the images as a datasets.Image column"
                    )
            else:
                self._problems.append(
                    f"column '{col}' (the {role} image) has type {feature!r}; it must be a datasets.Image "
                    "column or a column of image paths"
                )
        prompt_ok = self.prompt_column is not None and self.prompt_column in cols
        if self.prompt_column is not None and not prompt_ok and not self.default_prompt:
            self._problems.append(
                f"column '{self.prompt_column}' (the prompt) is not in the dataset (columns: {sorted(cols)}); "
                "set data.prompt_column, or data.default_prompt to use one prompt for all samples"
            )
        if any(r not in self._kind for r in ROLES):
            return  # column problems already reported; nothing else can be checked
        keep = [self.columns[r] for r in ROLES]
        if prompt_ok:
            keep.append(self.prompt_column)  # type: ignore[arg-type]
        names_ok = "name" in cols and isinstance(ds.features.get("name"), datasets.Value)
        if names_ok:
            keep.append("name")
        self._ds = ds.select_columns(list(dict.fromkeys(keep)))
        n = len(self._ds)
        if n == 0:
            self._problems.append(f"the dataset {self.describe()} has no rows; check data.split")
        self._names = [str(v) for v in self._ds["name"]] if names_ok else [f"row {i}" for i in range(n)]
        raw_prompts = list(self._ds[self.prompt_column]) if prompt_ok else [None] * n
        if prompt_ok:
            feature = ds.features[self.prompt_column]
            if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
                # Numbers are refused, not converted: a numeric "prompt" is almost always the wrong column.
                kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
                example = next((v for v in raw_prompts if v is not None), None)
                shown = f" (e.g. {self._names[0] if n else 'row 0'}: {example!r})" if example is not None else ""
                self._problems.append(
                    f"column '{self.prompt_column}' (the prompt) holds {kind} values, not text{shown}; prompts must be "
                    f"strings: set data.prompt_column to the column with the instructions, convert this one to text "
                    f"(ds.cast_column('{self.prompt_column}', datasets.Value('string')))"
                )
                self._prompts = [None] * n
                return
        for i, p in enumerate(raw_prompts):
            if isinstance(p, str) and p.strip():
                self._prompts.append(p.strip())
            elif self.default_prompt:
                self._prompts.append(self.default_prompt)
            else:
                self._prompts.append(None)
                self._problems.append(
                    f"{self._names[i]}: column '{self.prompt_column}' is empty; fill it or set data.default_prompt"
                )

    def prompt(self, i: int) -> str:
        """The prompt column of row ``i``, or the default prompt where it is empty."""
        p = self._prompts[i]
        if p is None:
            raise DatasetError(self.describe(), [f"{self._names[i]} has no prompt; fill the prompt column or set data.default_prompt"])
        return p

    def image_refs(self, i: int) -> dict[str, ImageRef]:
        """Bytes (or confined paths) of row ``i``'s three image cells, nothing decoded."""
        row = self._ds[i]
        out: dict[str, ImageRef] = {}
        for role in ROLES:
            col = self.columns[role]
            label = f"{self._names[i]}, column '{col}'"
            value = row[col]
            if self._kind[role] == "image":
                value = value or {}
                if value.get("bytes") is not None:
                    out[role] = ImageRef(label, data=value["bytes"])
                    continue
                value = value.get("path")
            out[role] = self._path_ref(label, value)
        return out

    def _path_ref(self, label: str, value: Any) -> ImageRef:
        if not isinstance(value, str) or not value:
            return ImageRef(label, problem="holds no image (no bytes and no path); fill the cell or drop the row")
        p = Path(value)
        if self._base is not None:
            p = p if p.is_absolute() else self._base / p
            why = _unresolvable(p)
            if why is not None:
                return ImageRef(f"{label} ({value})", problem=why)
            if not _inside(p, self._base):
                return ImageRef(
                    label,
                    problem=f"path {value!r} resolves outside the dataset folder {self._base}; keep the images inside it",
                )
        return ImageRef(f"{label} ({value})", path=p)


def open_source(
    kind: str,
    root: str | os.PathLike[str],
    *,
    default_prompt: str | None = None,
    prompts: str = "auto",
    split: str = "train",
    context_column: str = "context",
    target_column: str = "target",
    mask_column: str = "mask",
    prompt_column: str | None = "prompt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FolderSource | HFSource:
    """Build the source described by the trainer's ``data`` config.

    kind: ``"folder"`` (``root`` is the dataset folder) or ``"hf"`` (``root`` is a hub id or a
    local dataset path; the column names map the dataset's columns).
    """
    if kind == "folder":
        return FolderSource(root, default_prompt=default_prompt, prompts=prompts, max_pixels=max_pixels)
    if kind == "hf":
        return HFSource(
            root,
            split=split,
            context_column=context_column,
            target_column=target_column,
            mask_column=mask_column,
            prompt_column=prompt_column,
            default_prompt=default_prompt,
            max_pixels=max_pixels,
        )
    raise ValueError(f"data.kind must be 'folder' or 'hf', got {kind!r}")


def open_configured_source(data_cfg: Any, root: str | os.PathLike[str]) -> FolderSource | HFSource:
    """:func:`open_source` with the options of a ``data`` config section (``kontext.training.config.DataConfig``) at ``root``:
    the training data (``data.root``) and a held-out set (``validation.data_root``) are read the same way."""
    d = data_cfg
    return open_source(
        d.source,
        root,
        split=d.split,
        default_prompt=d.default_prompt,
        context_column=d.context_column,
        target_column=d.target_column,
        mask_column=d.mask_column,
        prompt_column=d.prompt_column,
        max_pixels=d.max_pixels,
    )
