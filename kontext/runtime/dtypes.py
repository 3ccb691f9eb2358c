"""Weight dtypes by the names configs and command lines use (``model.dtype``, ``export.save_dtype``, ``--dtype``)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
