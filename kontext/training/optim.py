"""The optimiser a config asks for, and the check (before any data or model is touched) that it can be built."""

from __future__ import annotations

from typing import Any

import torch

from kontext.errors import UserError
from kontext.runtime.quantization import QuantizationUnavailable, check_available


def check_optional_features(cfg: Any) -> None:
    """GPU-only and optional-package options fail here, with the install command, before any expensive work."""
    try:
        check_available(cfg.model.quantization)
    except QuantizationUnavailable as e:
        raise UserError(str(e)) from None
    if cfg.train.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise UserError("`train.optimizer: adamw8bit` needs a CUDA GPU (bitsandbytes); use `adamw` on this machine.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("`train.optimizer: adamw8bit` needs bitsandbytes: pip install -e '.[quantization]'.") from None
    tracker = cfg.logging.report_to
    if tracker != "none":
        # accelerate drops a tracker whose package is missing with only a log line: the run would train unlogged.
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[tracker]()
        if not available:
            install = "pip install -e '.[wandb]' (or pip install wandb)" if tracker == "wandb" else f"pip install {tracker}"
            raise UserError(
                f"`logging.report_to: {tracker}` needs the {tracker} package, which is not installed: {install}; "
                "or set logging.report_to=none."
            )
    if cfg.train.optimizer == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise UserError("`train.optimizer: prodigy` needs prodigyopt: pip install -e '.[prodigy]'.") from None


def make_optimizer(cfg: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``train.optimizer`` (adamw, adamw8bit or prodigy) over ``params`` with the config's betas, eps and decay."""
    train_cfg = cfg.train
    kwargs = {
        "lr": train_cfg.learning_rate,
        "betas": (train_cfg.adam_beta1, train_cfg.adam_beta2),
        "eps": train_cfg.adam_epsilon,
        "weight_decay": train_cfg.weight_decay,
    }
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if train_cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # availability checked in check_optional_features

        return bnb.optim.AdamW8bit(params, **kwargs)
    import prodigyopt

    return prodigyopt.Prodigy(params, **kwargs)
