"""One pass over a dataset that finds every problem before anything expensive runs.

    python -c "from data import open_source, validate_source; validate_source(open_source('folder', 'path/to/set'))"

:func:`validate_source` opens each image header first (size, pixel limit), decodes only what is
within the limit, and raises one :class:`DatasetError` listing every problem, each naming the file
and the fix.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .errors import DatasetError
from .images import ImageProblem, decode_mask, decode_rgb, mask_coverage_problem, open_header, oriented_size
from .sources import ROLES, TripletSource


def _check_sample(source: TripletSource, i: int, max_pixels: int) -> list[str]:
    problems: list[str] = []
    refs = source.image_refs(i)
    sizes: dict[str, tuple[int, int]] = {}
    for role in ROLES:
        ref = refs[role]
        try:
            img = open_header(ref, max_pixels)
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
            continue
        try:
            sizes[role] = oriented_size(img)
            if role == "mask":
                mask = decode_mask(img)
                why = mask_coverage_problem(mask)
                if why is not None:
                    problems.append(f"{ref.label}: mask {why}")
            else:
                decode_rgb(img)
        except ImageProblem as err:
            problems.append(f"{ref.label}: {err}")
        finally:
            img.close()
    if len(sizes) > 1 and len(set(sizes.values())) > 1:
        detail = ", ".join(f"{refs[r].label} is {w}x{h}" for r, (w, h) in sizes.items())
        problems.append(
            f"sample '{source.names[i]}': sizes differ ({detail}); context, target and mask must have the same "
            "size, resize them to match the target"
        )
    return problems


def validate_source(source: TripletSource, max_pixels: int | None = None, progress: bool = True) -> None:
    """Check every sample of ``source`` and raise :class:`DatasetError` listing all problems at once.

    Checks: the folder/columns exist and the dataset is not empty, every sample has context, target
    and mask and a prompt, every image opens and decodes, is within ``max_pixels`` (checked from the
    header before decoding; default ``source.max_pixels``), the three sizes agree, and the mask is
    greyscale, neither empty nor full. Returns None when the dataset is usable.
    """
    limit = source.max_pixels if max_pixels is None else max_pixels
    problems = source.scan_problems()
    n = len(source)
    if n == 0 and not problems:
        problems.append("the dataset has no samples; add some (see docs/data.md)")
    for i in tqdm(range(n), desc="Validating dataset", unit="sample", disable=not progress or n == 0):
        problems.extend(_check_sample(source, i, limit))
    if problems:
        raise DatasetError(source.describe(), problems)
