"""Samplers of the flow ODE, one k-diffusion-style signature (:class:`Sampler`): native Euler and Heun,
distilled few-step models, and diffusers schedulers wrapped as samplers; :data:`SAMPLERS` by name, and
classifier-free guidance as a denoiser. Conventions: :mod:`egolcd.flow`."""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import trange

from .flow_matching import NUM_TRAIN_TIMESTEPS, get_sigmas, predict_x0, shift_sigmas

logger = logging.getLogger(__name__)

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x, t) -> v``: x (B, C, F, H, W), t (B,) noise level in [0, 1]; returns v like x."""

Callback = Callable[[int, Tensor, Tensor], None]
"""``callback(i, x, denoised)``: step index, the sample entering step i and its x0 prediction."""


class Sampler(Protocol):
    """The one signature all samplers share (see :func:`sample_euler` for the arguments)."""

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        callback: Callback | None = None,
        disable_progress: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...




# --------------------------------------------------------------------------- guidance


def cfg_denoiser(cond: Denoiser, uncond: Denoiser, guidance: float) -> Denoiser:
    """Classifier-free guidance as a denoiser: ``uncond + guidance * (cond - uncond)``.

    ``guidance == 1`` returns ``cond`` itself (``uncond`` is never called); ``guidance == 0``
    returns ``uncond``. Otherwise both are evaluated once per call.
    """
    if guidance == 1.0:
        return cond
    if guidance == 0.0:
        return uncond

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_uncond = uncond(x, t)
        return v_uncond + guidance * (cond(x, t) - v_uncond)

    return guided


# --------------------------------------------------------------------------- native samplers


def _check_sigmas(sigmas: Tensor) -> Tensor:
    """Validated schedule, kept on the host: step sizes are then CPU scalars that GPU kernels take as
    arguments, and checks such as ``s_next == 0`` need no device-to-host sync inside the step loop."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with >= 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly descending")
    return sigmas


def _t_batch(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x.device, non_blocking=True).expand(x.shape[0])


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    disable_progress: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler on the flow ODE: ``x_{i+1} = x_i + (s_{i+1} - s_i) * v(x_i, s_i)``.

    Args:
        denoiser: ``(x, t) -> v``.
        x: start sample at noise level ``sigmas[0]`` (B, C, F, H, W); pure noise when ``sigmas[0] == 1``.
        sigmas: (num_steps + 1,) strictly descending noise levels.
        callback: ``callback(i, x_i, denoised_i)`` after each model evaluation.
        disable_progress: hide the tqdm bar.
        generator: unused (deterministic); accepted for the shared signature.

    Returns:
        the sample at ``sigmas[-1]``, like ``x``.
    """
    sigmas = _check_sigmas(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable_progress, desc="euler"):
        v = denoiser(x, _t_batch(sigmas[i], x))
        if callback is not None:
            callback(i, x, predict_x0(x, v, sigmas[i]))
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    disable_progress: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun (2nd order, trapezoidal corrector); a plain Euler step on a last step to 0.

    Costs two model evaluations per step except the last-to-zero one. Arguments as
    :func:`sample_euler`.
    """
    sigmas = _check_sigmas(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable_progress, desc="heun"):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = denoiser(x, _t_batch(s, x))
        if callback is not None:
            callback(i, x, predict_x0(x, v, s))
        dt = (s_next - s).to(x.dtype)
        x_euler = x + dt * v
        if float(s_next) == 0.0:
            x = x_euler
        else:
            v_next = denoiser(x_euler, _t_batch(s_next, x))
            x = x + dt * 0.5 * (v + v_next)
    return x


# --------------------------------------------------------------------------- distilled few-step models


def distilled_sigmas(
    denoising_step_list: list[int] | list[float] | tuple[float, ...],
    shift: float = 5.0,
    warp: bool = True,
) -> Tensor:
    """The schedule of a distilled few-step model (CausVid, Self-Forcing, LongLive) for
    :func:`sample_distilled`: their ``denoising_step_list`` (timesteps in 0..1000, descending) as
    noise levels, with a final 0 appended.

    Args:
        denoising_step_list: e.g. ``[1000, 750, 500, 250]`` (Self-Forcing, LongLive) or
            ``[1000, 757, 522]`` (CausVid).
        shift: their ``timestep_shift``; only used with ``warp``.
        warp: their ``warp_denoising_step``: a step ``s`` is the training scheduler's level at index
            ``1000 - s``, i.e. ``shift_sigmas(s / 1000, shift)``. Without it the level is ``s / 1000``
            (their re-noising then snaps to the nearest of the scheduler's 1000 levels; we do not).

    Returns:
        (len(list) + 1,) float32, strictly descending, ending at 0. ``distilled_sigmas([1000, 750, 500,
        250], 5.0)`` equals ``get_sigmas(4, 5.0)``.
    """
    steps = torch.as_tensor([float(s) for s in denoising_step_list], dtype=torch.float64)
    if steps.ndim != 1 or steps.numel() < 1:
        raise ValueError("denoising_step_list must be a non-empty list of timesteps")
    if bool((steps <= 0).any()) or bool((steps > NUM_TRAIN_TIMESTEPS).any()):
        raise ValueError(f"denoising steps must be in (0, {NUM_TRAIN_TIMESTEPS}], got {steps.tolist()}")
    t = steps / NUM_TRAIN_TIMESTEPS
    sigmas = shift_sigmas(t, shift) if warp else t
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
    return _check_sigmas(sigmas)


def _generator_from_sample(x: Tensor) -> torch.Generator:
    """A CPU generator seeded from (a prefix of) the sample's values: the same start, the same noise."""
    head = x.detach().flatten()[:4096].to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(head.numpy().tobytes()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:7], "little"))


def sample_distilled(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    disable_progress: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The few-step sampler of distilled models (CausVid, Self-Forcing, LongLive): at each level
    ``s_i`` predict the clean sample ``x0 = x - s_i * v(x, s_i)``, then re-noise it to the next level
    with *fresh* noise, ``x = (1 - s_{i+1}) * x0 + s_{i+1} * eps_i``; a last step to 0 returns ``x0``.

    Args:
        denoiser: ``(x, t) -> v`` (the model's flow prediction, as for the other samplers).
        x: start sample at ``sigmas[0]`` (pure noise when it is 1).
        sigmas: (num_steps + 1,) strictly descending levels, e.g. :func:`distilled_sigmas` of the
            model's ``denoising_step_list``, or ``get_sigmas(steps, shift)`` (for Self-Forcing's and
            LongLive's ``[1000, 750, 500, 250]`` with shift 5 the two are equal).
        callback: ``callback(i, x_i, x0_i)`` after each model evaluation.
        disable_progress: hide the tqdm bar.
        generator: draws the fresh noise (CPU generators draw on the host, then copy). ``None``: a CPU
            generator seeded from the values of ``x``, so the same start gives the same output (runs
            seeded per chunk stay reproducible and resumable); that costs one small device-to-host copy
            per call.

    Returns:
        the sample at ``sigmas[-1]``, like ``x``.
    """
    sigmas = _check_sigmas(sigmas)
    if generator is None:
        generator = _generator_from_sample(x)
    for i in trange(len(sigmas) - 1, disable=disable_progress, desc="distilled"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = predict_x0(x, denoiser(x, _t_batch(s, x)), s)
        if callback is not None:
            callback(i, x, x0)
        if float(s_next) == 0.0:
            x = x0
        else:
            eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
            x = (1 - s_next).to(x.dtype) * x0 + s_next.to(x.dtype) * eps.to(device=x.device, dtype=x.dtype)
    return x


# --------------------------------------------------------------------------- diffusers schedulers

_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "unipc": UniPCMultistepScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}


def make_scheduler(name: str, num_steps: int, shift: float = 5.0) -> SchedulerMixin:
    """A diffusers flow scheduler configured as Wan2.1's pipeline does, with timesteps set.

    ``"unipc"``: ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=shift)``; ``"flow_euler"``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``. Save it
    with ``scheduler.save_pretrained(dir)`` (diffusers layout) and read it back with
    :func:`load_scheduler`.
    """
    if name == "unipc":
        scheduler: SchedulerMixin = UniPCMultistepScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            final_sigmas_type="zero",
        )
    elif name == "flow_euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    else:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(_SCHEDULERS)}")
    scheduler.set_timesteps(num_steps)
    return scheduler


def load_scheduler(directory: str) -> SchedulerMixin:
    """Load a scheduler saved by ``save_pretrained`` (``scheduler_config.json``); local path or hub id."""
    config = UniPCMultistepScheduler.load_config(directory)  # generic ConfigMixin reader
    cls_name = config.get("_class_name")
    for cls in _SCHEDULERS.values():
        if cls.__name__ == cls_name:
            return cls.from_config(config)
    raise ValueError(f"unsupported scheduler class {cls_name!r} in {directory}")


# Config keys that would transform sigmas handed to ``set_timesteps(sigmas=...)``; neutralised so the
# given (already shifted) schedule is used as is.
_NEUTRAL = {
    "shift": 1.0,
    "flow_shift": 1.0,
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
}


def _infer_shift(sigmas: Tensor) -> float:
    """Recover ``shift`` of a :func:`get_sigmas` schedule (fallback for schedulers without ``sigmas=``)."""
    n = len(sigmas) - 1
    u, s = 1.0 - 1.0 / n, float(sigmas[1])
    shift = s * (1 - u) / (u * (1 - s)) if n > 1 else 1.0
    if not torch.allclose(get_sigmas(n, shift).to(sigmas), sigmas, atol=1e-4):
        raise ValueError(
            "this diffusers scheduler cannot take custom sigmas and the given schedule is not get_sigmas(n, shift)"
        )
    return shift


def _prepare_scheduler(scheduler: SchedulerMixin, sigmas: Tensor) -> SchedulerMixin:
    if float(sigmas[-1]) != 0.0:
        raise ValueError("diffusers-backed samplers need a schedule that ends at 0")
    config = dict(scheduler.config)
    config.update({k: v for k, v in _NEUTRAL.items() if k in config})
    if "sigmas" in inspect.signature(type(scheduler).set_timesteps).parameters:
        sched = type(scheduler).from_config(config)
        sched.set_timesteps(sigmas=np.asarray(sigmas[:-1].cpu(), dtype=np.float32), device=sigmas.device)
    else:  # older diffusers: rebuild the schedule from (num_steps, shift); close to, not equal to, sigmas
        shift = _infer_shift(sigmas)
        logger.warning(
            "%s.set_timesteps has no sigmas=; using num_steps and shift=%.3f", type(scheduler).__name__, shift
        )
        config.update({"shift": shift} if "shift" in config else {"flow_shift": shift})
        sched = type(scheduler).from_config(config)
        sched.set_timesteps(len(sigmas) - 1, device=sigmas.device)
    sched.set_begin_index(0)  # step by position, not by looking up (possibly rounded) timesteps
    return sched


def sampler_from_scheduler(scheduler: SchedulerMixin) -> Sampler:
    """A sampler with the shared signature that runs a diffusers flow scheduler's update rule.

    Each call builds a fresh scheduler from ``scheduler.config`` with its own shifting turned off
    (``shift``/``flow_shift`` = 1, no dynamic/terminal shift, no karras/exponential/beta sigmas) and
    sets the given ``sigmas[:-1]`` through ``set_timesteps(sigmas=...)``; the scheduler appends the
    final 0. So the schedule is the caller's, exactly (UniPC nudges a leading 1.0 to 1 - 1e-6 to
    avoid log(0)). Diffusers versions whose ``set_timesteps`` lacks ``sigmas=`` fall back to
    ``set_timesteps(num_steps)`` with the shift inferred from ``sigmas`` (which must then come from
    :func:`get_sigmas`), logging a warning. The denoiser gets the scheduler's float sigma as ``t``
    (not its integer timestep), and ``sigmas`` must end at 0.
    """

    def sample(
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        callback: Callback | None = None,
        disable_progress: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        sigmas_ = _check_sigmas(sigmas)
        sched = _prepare_scheduler(scheduler, sigmas_)
        step_kwargs: dict[str, Any] = {}
        if "generator" in inspect.signature(sched.step).parameters:
            step_kwargs["generator"] = generator
        run_sigmas = sched.sigmas.to(device=x.device, dtype=torch.float32)
        for i in trange(len(sched.timesteps), disable=disable_progress, desc=type(sched).__name__):
            t = run_sigmas[i]
            v = denoiser(x, _t_batch(t, x))
            if callback is not None:
                callback(i, x, predict_x0(x, v, t))
            x = sched.step(v, sched.timesteps[i], x, return_dict=False, **step_kwargs)[0]
        return x

    return sample


_default_unipc = sampler_from_scheduler(make_scheduler("unipc", 1, shift=1.0))
_default_flow_euler = sampler_from_scheduler(make_scheduler("flow_euler", 1, shift=1.0))


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    disable_progress: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """UniPC (bh2, order 2, as Wan2.1) via diffusers' ``UniPCMultistepScheduler`` on the given sigmas.

    One model evaluation per step. See :func:`sampler_from_scheduler` for how ``sigmas`` reach the
    scheduler; other arguments as :func:`sample_euler`.
    """
    return _default_unipc(
        denoiser, x, sigmas, callback=callback, disable_progress=disable_progress, generator=generator
    )


def sample_flow_euler_diffusers(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    disable_progress: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler via diffusers' ``FlowMatchEulerDiscreteScheduler`` on the given sigmas (cross-check of
    :func:`sample_euler`). See :func:`sampler_from_scheduler`; arguments as :func:`sample_euler`."""
    return _default_flow_euler(
        denoiser, x, sigmas, callback=callback, disable_progress=disable_progress, generator=generator
    )


SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "unipc": sample_unipc,
    "flow_euler": sample_flow_euler_diffusers,
    "distilled": sample_distilled,
}


def get_sampler(name: str) -> Sampler:
    """Look up a sampler in :data:`SAMPLERS` by name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}") from None
