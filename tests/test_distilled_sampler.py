"""The distilled few-step sampler (CausVid / Self-Forcing / LongLive): predict x0, re-noise with fresh noise."""

from __future__ import annotations

import pytest
import torch

from egolcd.flow import SAMPLERS, distilled_sigmas, get_sampler, get_sigmas, sample_distilled, shift_sigmas


def _denoiser():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any deterministic function of (x, t)
        return torch.einsum("ij,bjfhw->bifhw", w, x) + t.view(-1, 1, 1, 1, 1) * x.tanh()

    return v


def _reference(denoiser, x, sigmas, generator):
    """The rule of Self-Forcing's inference loop, written out: flow_pred -> x0 = x_t - sigma_t * flow_pred;
    next level: add_noise(x0, randn, t_next) = (1 - sigma_next) * x0 + sigma_next * noise."""
    xs, x0s = [], []
    for i in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), float(sigmas[i]))
        x0 = x - float(sigmas[i]) * denoiser(x, t)
        xs.append(x.clone())
        x0s.append(x0.clone())
        s_next = float(sigmas[i + 1])
        if s_next == 0:
            x = x0
        else:
            noise = torch.randn(x.shape, generator=generator)
            x = (1 - s_next) * x0 + s_next * noise
    return x, xs, x0s


def test_matches_direct_reimplementation_step_for_step():
    denoiser = _denoiser()
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = distilled_sigmas([1000, 750, 500, 250], shift=5.0)
    seen = []
    out = sample_distilled(denoiser, x, sigmas, generator=torch.Generator().manual_seed(7),
                           callback=lambda i, xi, x0: seen.append((i, xi.clone(), x0.clone())))
    ref, xs, x0s = _reference(denoiser, x, sigmas, torch.Generator().manual_seed(7))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    for (_, xi, x0), rx, rx0 in zip(seen, xs, x0s):
        torch.testing.assert_close(xi, rx, rtol=0, atol=1e-6)
        torch.testing.assert_close(x0, rx0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # fresh noise at every level: not an ODE step (Euler on the same schedule differs)
    assert (out - SAMPLERS["euler"](denoiser, x, sigmas)).abs().max() > 1e-3


def test_self_forcing_warped_step_list():
    """Self-Forcing/LongLive: timesteps = FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True) at
    1000 training steps, indexed by 1000 - denoising_step_list; recomputed here from that recipe."""
    shift = 5.0
    train = torch.linspace(1.0, 0.0, 1001)[:-1]
    train = shift * train / (1 + (shift - 1) * train)
    timesteps = torch.cat([train * 1000, torch.zeros(1)])
    steps = torch.tensor([1000, 750, 500, 250])
    theirs = timesteps[1000 - steps] / 1000
    ours = distilled_sigmas([1000, 750, 500, 250], shift=shift, warp=True)
    torch.testing.assert_close(ours[:-1], theirs, rtol=0, atol=1e-6)
    assert float(ours[-1]) == 0.0
    # and it is the pipeline's default schedule for 4 steps at shift 5
    torch.testing.assert_close(ours, get_sigmas(4, 5.0), rtol=0, atol=1e-6)


def test_unwarped_step_list():
    sig = distilled_sigmas([1000, 757, 522], warp=False)
    assert sig.tolist() == pytest.approx([1.0, 0.757, 0.522, 0.0])
    torch.testing.assert_close(distilled_sigmas([500], shift=3.0), torch.stack([shift_sigmas(0.5, 3.0), torch.tensor(0.0)]).float())
    with pytest.raises(ValueError):
        distilled_sigmas([1000, 1000])  # not strictly descending
    with pytest.raises(ValueError):
        distilled_sigmas([1200, 500])


def test_default_noise_is_seeded_by_the_start_sample():
    denoiser = _denoiser()
    x = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = get_sigmas(4, 5.0)
    a = sample_distilled(denoiser, x, sigmas)
    b = sample_distilled(denoiser, x.clone(), sigmas)
    assert torch.equal(a, b)  # same start, same result: per-chunk seeded runs stay reproducible
    c = sample_distilled(denoiser, x + 1e-3, sigmas)
    assert not torch.equal(a, c)


def test_single_step_is_x0_prediction_and_selectable_by_name():
    denoiser = _denoiser()
    x = torch.randn(1, 4, 1, 2, 2)
    out = get_sampler("distilled")(denoiser, x, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, x - denoiser(x, torch.ones(1)))
