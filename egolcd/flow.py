"""Flow matching (rectified flow) as in Wan2.1: schedule, training helpers and samplers.

The face of two modules whose names it re-exports: :mod:`egolcd.flow_matching` (the schedule and the
training objective) and :mod:`egolcd.samplers` (the samplers, diffusers schedulers and guidance).

Convention (METHOD.md, "Objective"):

* ``t`` in [0, 1] is the noise level (``sigma``): ``x_t = (1 - t) * x0 + t * eps``.
* The model predicts the velocity ``v = eps - x0``; so ``x0 = x_t - t * v``.
* The transformer itself is called with ``timestep = t * 1000`` (:func:`to_model_timestep`).
* Wan's timestep shift ``shift * t / (1 + (shift - 1) * t)`` moves steps toward high noise.

Samplers follow k-diffusion: plain functions with one signature,
``sampler(denoiser, x, sigmas, *, callback=None, disable_progress=True, generator=None)``,
where ``denoiser(x, t) -> v`` is any callable (the model wrapped; never reached into) and
``sigmas`` (num_steps + 1,) is a descending schedule, usually from :func:`get_sigmas`. Samplers
run under the caller's grad mode: wrap inference in ``torch.inference_mode()``.

    >>> import torch
    >>> sigmas = get_sigmas(4, shift=1.0)
    >>> sigmas.tolist()
    [1.0, 0.75, 0.5, 0.25, 0.0]
    >>> x0 = torch.ones(1, 1, 1, 1, 1)
    >>> out = sample_euler(lambda x, t: (x - x0) / t.view(-1, 1, 1, 1, 1), torch.zeros_like(x0), sigmas)
    >>> torch.allclose(out, x0)
    True
"""

from __future__ import annotations

from .flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    expand_chunk_timesteps,
    flow_matching_loss,
    get_sigmas,
    predict_x0,
    sample_training_timesteps,
    shift_sigmas,
    to_model_timestep,
    velocity_target,
)
from .samplers import (
    SAMPLERS,
    Callback,
    Denoiser,
    Sampler,
    cfg_denoiser,
    distilled_sigmas,
    get_sampler,
    load_scheduler,
    make_scheduler,
    sample_distilled,
    sample_euler,
    sample_flow_euler_diffusers,
    sample_heun,
    sample_unipc,
    sampler_from_scheduler,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "SAMPLERS",
    "Callback",
    "Denoiser",
    "Sampler",
    "add_noise",
    "cfg_denoiser",
    "distilled_sigmas",
    "expand_chunk_timesteps",
    "flow_matching_loss",
    "get_sampler",
    "get_sigmas",
    "load_scheduler",
    "make_scheduler",
    "predict_x0",
    "sample_distilled",
    "sample_euler",
    "sample_flow_euler_diffusers",
    "sample_heun",
    "sample_training_timesteps",
    "sample_unipc",
    "sampler_from_scheduler",
    "shift_sigmas",
    "to_model_timestep",
    "velocity_target",
]
