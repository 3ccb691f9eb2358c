"""The Hugging Face datasets source: context/target/mask image columns and a prompt column.

Opening an :class:`HFSource` loads the dataset (hub id, local folder, ``save_to_disk`` folder or a
single data file), checks the columns and the prompts, and records every problem in
:meth:`~HFSource.scan_problems`; image cells are read (not decoded) only when a sample is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..images import DEFAULT_MAX_PIXELS, ImageRef
from .base import ROLES, _inside, _SourceBase, _unresolvable

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
        self._ds: Any = None
        self._kind: dict[str, str] = {}
        self._base: Path | None = None
        self._names: list[str] = []
        self._prompts: list[str | None] = []
        # Rows whose prompt is ``default_prompt`` although some other row has its own (see validate_source).
        self.defaulted_prompts: list[str] = []
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
        defaulted: list[str] = []
        for i, p in enumerate(raw_prompts):
            if isinstance(p, str) and p.strip():
                self._prompts.append(p.strip())
            elif self.default_prompt:
                self._prompts.append(self.default_prompt)
                defaulted.append(self._names[i])
            else:
                self._prompts.append(None)
                self._problems.append(
                    f"{self._names[i]}: column '{self.prompt_column}' is empty; fill it or set data.default_prompt"
                )
        if len(defaulted) < n:
            self.defaulted_prompts = defaulted

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
