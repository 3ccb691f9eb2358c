"""What training does, measured on the committed tiny FLUX.1 Kontext with the trainer's own functions.

A short run on two samples must fit them (the flow loss falls markedly), and the geometry terms must
train only the velocity of the target tokens: the context tokens are conditioning, and their output
positions are never read.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_run_dict
from data.synthetic import generate_dataset
from kontext.training.config import config_from_dict
from kontext.tiny.model import tiny_model_path
from train_kontext_lora import compute_loss, setup, train

OVERFIT_STEPS = 30
EVAL_DRAWS = 4


@pytest.fixture(scope="module")
def two_sample_run(tmp_path_factory: pytest.TempPathFactory):
    """A set-up run on two 64 px samples (one batch holds both), and that batch on the run's device."""
    tmp = tmp_path_factory.mktemp("behaviour")
    data_dir = generate_dataset(tmp / "data", num_samples=2, size=(64, 64), seed=0, progress=False)
    cfg = config_from_dict(
        tiny_run_dict(
            tmp / "out",
            tiny_model_path(progress=False),
            data_dir,
            tmp / "cache",
            lora={"rank": 8, "alpha": 8},
            train={
                "max_steps": OVERFIT_STEPS,
                "batch_size": 2,
                "learning_rate": 1e-2,
                "lr_warmup_steps": 0,
                "weighting_scheme": "logit_normal",
            },
            checkpoint={"every_steps": 0},
            loss={"geometry": {"enabled": True}},
        )
    )
    assert cfg.loss.geometry.enabled and cfg.lora.dropout == 0.0
    run = setup(cfg)
    batch = next(run.batches())
    assert batch.batch_size == 2
    run.data_state.update(epoch=0, position=0)  # training starts from the first batch, as a fresh run does
    return run, batch


def _mean_flow_loss(run, batch) -> float:
    """The flow loss on the two samples, averaged over fixed noise and timestep draws (the same every call)."""
    with torch.no_grad():
        values = [
            compute_loss(run.transformer, batch, run.cfg.loss, run.cfg.train, run.cfg.model.guidance_scale,
                         torch.Generator().manual_seed(1000 + k), run.train_scheduler)[1]
            for k in range(EVAL_DRAWS)
        ]
    return sum(float(v["loss/flow"]) for v in values) / EVAL_DRAWS


def _output_token_grad(run, batch, cfg, seed: int) -> torch.Tensor:
    """d(loss)/d(transformer output tokens) ``[B, target + context tokens, 64]`` for one draw."""
    captured: dict[str, torch.Tensor] = {}

    def keep_output(module, args, kwargs, output):
        out = output[0]
        out.retain_grad()
        captured["out"] = out

    handle = run.transformer.register_forward_hook(keep_output, with_kwargs=True)
    try:
        loss, _ = compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                               torch.Generator().manual_seed(seed), run.train_scheduler)
        loss.backward()
    finally:
        handle.remove()
        run.transformer.zero_grad(set_to_none=True)
    return captured["out"].grad.detach().clone()


def _with_geometry(cfg, **changes):
    """``cfg`` with ``loss.geometry`` fields changed."""
    geometry = dataclasses.replace(cfg.loss.geometry, **changes)
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, geometry=geometry))


def test_geometry_gradient_reaches_only_the_target_tokens_velocity(two_sample_run):
    """The geometry part of the gradient at the transformer output: the same draw with the geometry terms on and
    off, the difference of the two gradients (the flow part is the same in both and cancels)."""
    run, batch = two_sample_run
    cfg = run.cfg
    without = _with_geometry(cfg, enabled=False)
    g_on = _output_token_grad(run, batch, cfg, seed=5)
    g_off = _output_token_grad(run, batch, without, seed=5)
    geometry_grad = g_on - g_off

    h, w = batch.target_latents.shape[-2:]
    n_target = (h // 2) * (w // 2)
    n_context = (batch.context_latents.shape[-2] // 2) * (batch.context_latents.shape[-1] // 2)
    assert geometry_grad.shape[1] == n_target + n_context
    # Nothing reaches the context tokens' output positions, from either term.
    assert torch.count_nonzero(g_on[:, n_target:]) == 0
    assert torch.count_nonzero(geometry_grad[:, n_target:]) == 0
    # Every sample's target tokens get a geometry gradient, most of its token positions a clear one (far above
    # what rounding leaves of the cancelled flow part).
    per_token = geometry_grad[:, :n_target].abs().amax(dim=-1)
    peak = per_token.amax(dim=1, keepdim=True)
    assert (peak > 1e-6).all(), per_token
    assert ((per_token > 1e-3 * peak).float().mean(dim=1) > 0.5).all(), per_token


@pytest.mark.parametrize(("sigma", "scheme", "factor"), [
    (0.25, "one_minus_sigma", 0.75),
    (0.25, "one_minus_sigma_sq", 0.5625),
    (0.6, "one_minus_sigma", 0.4),
    (1.0, "one_minus_sigma", 0.0),
])
def test_noise_weighting_scales_the_geometry_terms_by_the_noise_level(two_sample_run, sigma, scheme, factor):
    """Every draw at one noise level (a training table holding only that sigma): what the geometry terms add to the
    loss is the unweighted amount times the scheme's weight at that sigma, and the flow loss does not change."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    run, batch = two_sample_run
    table = FlowMatchEulerDiscreteScheduler.from_config(run.train_scheduler.config)
    table.sigmas = torch.full_like(table.sigmas, sigma)
    table.timesteps = table.sigmas * table.config.num_train_timesteps
    logs = {}
    with torch.no_grad():
        for name in ("none", scheme):
            cfg = _with_geometry(run.cfg, noise_weighting=name)
            logs[name] = compute_loss(run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale,
                                      torch.Generator().manual_seed(3), table)[1]
    # What the geometry terms add to the trained loss.
    added = {k: float(v["loss/total"]) - float(v["loss/flow"]) for k, v in logs.items()}
    assert added["none"] > 1e-4
    assert added[scheme] == pytest.approx(factor * added["none"], rel=1e-4, abs=1e-7)
    assert float(logs[scheme]["loss/flow"]) == float(logs["none"]["loss/flow"])


def test_short_overfit_on_two_samples_lowers_the_flow_loss_markedly(two_sample_run):
    run, batch = two_sample_run
    before = _mean_flow_loss(run, batch)
    lora_before = {n: p.detach().clone() for n, p in run.transformer.named_parameters() if p.requires_grad}
    assert train(run) == "done"
    assert [h["step"] for h in run.history] == list(range(1, OVERFIT_STEPS + 1))
    lora_after = dict(run.transformer.named_parameters())
    assert any(not torch.equal(v, lora_after[n]) for n, v in lora_before.items())
    after = _mean_flow_loss(run, batch)
    # Measured: it falls to about 40 % of its start in 30 steps; updates that do not follow the gradient leave it
    # where it was or above.
    assert after < 0.6 * before, (before, after)
