"""The flow-matching objective as in Wan2.1: timestep convention, the shifted schedule, and the training
helpers (noise levels, noising, velocity target, loss). Conventions: :mod:`egolcd.flow`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
"""Wan's ``num_train_timesteps``: the transformer sees ``timestep = t * 1000``."""

_T_EPS = 1e-5  # training timesteps are drawn from [_T_EPS, 1 - _T_EPS] before the shift

# --------------------------------------------------------------------------- schedule


def to_model_timestep(t: Tensor | float) -> Tensor:
    """Wan's transformer timestep for noise level ``t``: ``t * 1000`` (float, not rounded)."""
    return torch.as_tensor(t) * NUM_TRAIN_TIMESTEPS


def shift_sigmas(t: Tensor | float, shift: float) -> Tensor:
    """Wan's timestep shift ``shift * t / (1 + (shift - 1) * t)``; maps [0, 1] onto itself, monotone.

    Args:
        t: noise levels, any shape.
        shift: > 0; 1.0 is the identity, > 1 spends more steps at high noise (Wan2.1: 5.0, or 3.0).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.as_tensor(t)
    return shift * t / (1 + (shift - 1) * t)


def get_sigmas(num_steps: int, shift: float = 5.0, device: torch.device | str | None = None) -> Tensor:
    """The sampling schedule of Wan2.1: ``linspace(1, 0, num_steps + 1)``, shifted.

    Args:
        num_steps: number of model evaluations of a first-order sampler (>= 1).
        shift: see :func:`shift_sigmas`.
        device: where the schedule lives.

    Returns:
        (num_steps + 1,) float32, strictly descending, ``sigmas[0] == 1`` and ``sigmas[-1] == 0``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigmas(t, shift).to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------- training helpers


def _expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast noise levels ``t`` scalar, (B,) or (B, F) over ``x`` (B, C, F, H, W) (or (B, ...))."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim == 1:
        if t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t of shape {tuple(t.shape)} does not match batch {x.shape[0]}")
        return t.view(-1, *([1] * (x.ndim - 1)))
    if t.ndim == 2:
        if x.ndim != 5 or t.shape[1] != x.shape[2] or t.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"per-frame t {tuple(t.shape)} needs a (B, C, F, H, W) latent, got {tuple(x.shape)}"
            )
        return t[:, None, :, None, None]
    raise ValueError(f"t must be a scalar, (B,) or (B, F), got shape {tuple(t.shape)}")


def expand_chunk_timesteps(t: Tensor, chunk_frames: int) -> Tensor:
    """Per-chunk noise levels (B, num_chunks) -> per-frame (B, num_chunks * chunk_frames)."""
    return t.repeat_interleave(chunk_frames, dim=1)


def sample_training_timesteps(
    shape: int | tuple[int, ...],
    *,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    distribution: Literal["uniform", "logit_normal"] = "uniform",
) -> Tensor:
    """Draw training noise levels ``t`` in (0, 1), shifted like the sampling schedule.

    ``u`` is drawn uniformly or logit-normally (``sigmoid(N(0, 1))``, SD3), kept in
    [1e-5, 1 - 1e-5], and mapped through :func:`shift_sigmas`.

    Args:
        shape: (B,) for one level per sample; (B, num_chunks) for per-chunk levels
            (diffusion forcing; expand with :func:`expand_chunk_timesteps`).
        shift: see :func:`shift_sigmas`; 1.0 draws ``u`` unchanged.
        generator: for reproducible draws (on ``device``'s type, as torch requires).
        device: where the result lives.
        distribution: "uniform" or "logit_normal".

    Returns:
        float32 tensor of ``shape``.
    """
    if isinstance(shape, int):
        shape = (shape,)
    if distribution == "uniform":
        u = torch.rand(shape, generator=generator, device=device)
    elif distribution == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r}; use 'uniform' or 'logit_normal'")
    u = u.clamp(_T_EPS, 1.0 - _T_EPS)
    return shift_sigmas(u, shift).float()


def add_noise(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """``x_t = (1 - t) * x0 + t * eps``.

    Args:
        x0: clean latent (B, C, F, H, W).
        eps: standard normal noise like ``x0``.
        t: scalar, (B,) or per-frame (B, F) noise levels.
    """
    t = _expand_t(t, x0).to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching target ``v = eps - x0`` (same shape as ``x0``)."""
    return eps - x0


def predict_x0(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """Clean estimate from a velocity: ``x0 = x_t - t * v``; t scalar, (B,) or (B, F)."""
    return x_t - _expand_t(t, x_t).to(x_t.dtype) * v


def flow_matching_loss(
    v_pred: Tensor,
    x0: Tensor,
    eps: Tensor,
    weight: Tensor | None = None,
    frame_mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error between ``v_pred`` and ``eps - x0``, computed in float32.

    The squared error is averaged over (C, H, W) per frame, then over the selected frames:
    ``sum(mask * w * L) / sum(mask)``.

    Args:
        v_pred: predicted velocity (B, C, F, H, W).
        x0: clean latent (B, C, F, H, W).
        eps: noise (B, C, F, H, W).
        weight: optional per-sample (B,) or per-frame (B, F) loss weights.
        frame_mask: optional bool (B, F); only frames where it is True count (e.g. the noisy
            current chunk, not the clean context). An all-False mask gives 0 (with a graph).

    Returns:
        scalar loss.
    """
    if v_pred.shape != x0.shape or eps.shape != x0.shape:
        raise ValueError(
            f"shapes differ: v_pred {tuple(v_pred.shape)}, x0 {tuple(x0.shape)}, eps {tuple(eps.shape)}"
        )
    if v_pred.ndim != 5:
        raise ValueError(f"expected (B, C, F, H, W) latents, got {tuple(v_pred.shape)}")
    err = (v_pred.float() - velocity_target(x0.float(), eps.float())).square()
    per_frame = err.mean(dim=(1, 3, 4))  # (B, F)
    if weight is not None:
        weight = weight.to(per_frame)
        if weight.ndim == 1:
            weight = weight[:, None]
        if weight.ndim != 2:
            raise ValueError(f"weight must be (B,) or (B, F), got {tuple(weight.shape)}")
        per_frame = per_frame * weight
    if frame_mask is None:
        return per_frame.mean()
    if frame_mask.shape != per_frame.shape:
        raise ValueError(
            f"frame_mask must be (B, F) = {tuple(per_frame.shape)}, got {tuple(frame_mask.shape)}"
        )
    mask = frame_mask.to(device=per_frame.device, dtype=torch.bool)
    count = mask.sum()
    return torch.where(mask, per_frame, torch.zeros_like(per_frame)).sum() / count.clamp_min(1)
