"""Tests for egolcd.flow: schedule, training helpers, samplers, guidance, diffusers schedulers."""

from __future__ import annotations

import pytest
import torch

from egolcd import flow, samplers
from egolcd.flow import (
    SAMPLERS,
    add_noise,
    cfg_denoiser,
    expand_chunk_timesteps,
    flow_matching_loss,
    get_sampler,
    get_sigmas,
    load_scheduler,
    make_scheduler,
    predict_x0,
    sample_euler,
    sample_flow_euler_diffusers,
    sample_heun,
    sample_training_timesteps,
    sample_unipc,
    sampler_from_scheduler,
    shift_sigmas,
    to_model_timestep,
    velocity_target,
)

MU, STD = 0.7, 0.5  # the 1-D Gaussian data distribution N(MU, STD^2), applied per element


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.ndim - 1))).to(x)


def point_oracle(x0: torch.Tensor) -> flow.Denoiser:
    """Exact velocity when the data is the single point x0: v = (x - x0) / t (t > 0 is all samplers use)."""

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        assert bool((t > 0).all()), "a sampler evaluated the model at t = 0"
        return (x - x0) / _bcast(t, x)

    return denoiser


def gaussian_oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(MU, STD^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x)
    var = (1 - t) ** 2 * STD**2 + t**2
    return (t - (1 - t) * STD**2) / var * (x - (1 - t) * MU) - MU


def _noise(n: int = 8192, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, 2, generator=_gen(seed))


# --------------------------------------------------------------------------- schedule


def test_to_model_timestep() -> None:
    assert torch.allclose(
        to_model_timestep(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0])
    )
    assert float(to_model_timestep(0.5)) == 500.0


def test_shift_sigmas_closed_form() -> None:
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_sigmas(t, 1.0), t)
    assert torch.allclose(shift_sigmas(t, 5.0), 5 * t / (1 + 4 * t))
    assert float(shift_sigmas(0.5, 3.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        shift_sigmas(t, 0.0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_get_sigmas(num_steps: int, shift: float) -> None:
    s = get_sigmas(num_steps, shift)
    assert s.shape == (num_steps + 1,) and s.dtype == torch.float32
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all())
    u = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    assert torch.allclose(s.double(), shift * u / (1 + (shift - 1) * u), atol=1e-7)


def test_get_sigmas_shift_moves_steps_to_high_noise() -> None:
    assert bool((get_sigmas(10, 5.0)[1:-1] > get_sigmas(10, 1.0)[1:-1]).all())
    with pytest.raises(ValueError):
        get_sigmas(0)


# --------------------------------------------------------------------------- training helpers


def test_noise_velocity_x0_identities() -> None:
    g = _gen(1)
    x0, eps = torch.randn(3, 4, 5, 2, 2, generator=g), torch.randn(3, 4, 5, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = add_noise(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    v = velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    assert torch.allclose(predict_x0(xt, v, t), x0, atol=1e-6)
    # the velocity is the time derivative of x_t
    dt = 1e-3
    x0d, epsd, td = x0.double(), eps.double(), t.double()
    fd = (add_noise(x0d, epsd, td + dt) - add_noise(x0d, epsd, td)) / dt
    assert torch.allclose(fd, v.double(), atol=1e-5)


def test_add_noise_per_frame_timesteps() -> None:
    g = _gen(2)
    x0, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    t = torch.tensor([[0.0, 0.25, 0.5, 1.0], [1.0, 0.1, 0.9, 0.0]])
    xt = add_noise(x0, eps, t)
    for b in range(2):
        for f in range(4):
            expected = (1 - t[b, f]) * x0[b, :, f] + t[b, f] * eps[b, :, f]
            assert torch.allclose(xt[b, :, f], expected)
    assert torch.allclose(predict_x0(xt, eps - x0, t), x0, atol=1e-6)
    with pytest.raises(ValueError):
        add_noise(x0, eps, torch.rand(2, 3))  # wrong number of frames


def test_expand_chunk_timesteps() -> None:
    t = torch.tensor([[0.1, 0.9]])
    assert torch.equal(expand_chunk_timesteps(t, 3), torch.tensor([[0.1, 0.1, 0.1, 0.9, 0.9, 0.9]]))


@pytest.mark.parametrize("distribution", ["uniform", "logit_normal"])
def test_sample_training_timesteps(distribution: str) -> None:
    t = sample_training_timesteps((4096, 3), shift=1.0, generator=_gen(3), distribution=distribution)
    assert t.shape == (4096, 3) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    assert float(t.median()) == pytest.approx(0.5, abs=0.03)  # both are symmetric around 1/2 unshifted
    again = sample_training_timesteps((4096, 3), shift=1.0, generator=_gen(3), distribution=distribution)
    assert torch.equal(t, again)
    shifted = sample_training_timesteps(4096, shift=5.0, generator=_gen(3), distribution=distribution)
    assert float(shifted.median()) == pytest.approx(float(shift_sigmas(0.5, 5.0)), abs=0.03)
    assert bool(((shifted > 0) & (shifted < 1)).all())


def test_sample_training_timesteps_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="logit_normal"):
        sample_training_timesteps(4, distribution="beta")  # type: ignore[arg-type]


def test_flow_matching_loss() -> None:
    g = _gen(4)
    x0, eps = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    v = eps - x0
    assert float(flow_matching_loss(v, x0, eps)) == 0.0
    assert float(flow_matching_loss(v + 1.0, x0, eps)) == pytest.approx(1.0)
    # error only in frame 0: the mask decides whether it counts
    bad = v.clone()
    bad[:, :, 0] += 2.0
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, 1:] = True
    assert float(flow_matching_loss(bad, x0, eps, frame_mask=mask)) == 0.0
    assert float(flow_matching_loss(bad, x0, eps, frame_mask=~mask)) == pytest.approx(4.0)
    assert float(flow_matching_loss(bad, x0, eps)) == pytest.approx(1.0)  # 4 on 1 of 4 frames
    weight = torch.tensor([[0.5, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    assert float(flow_matching_loss(bad, x0, eps, weight=weight)) == pytest.approx((2.0 + 0.0) / 8)
    assert float(flow_matching_loss(bad, x0, eps, weight=torch.tensor([1.0, 0.0]))) == pytest.approx(0.5)
    empty = flow_matching_loss(bad.requires_grad_(), x0, eps, frame_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert float(empty.detach()) == 0.0
    empty.backward()


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_samplers_recover_single_point(name: str, shift: float) -> None:
    x0 = torch.randn(2, 4, 3, 2, 2, generator=_gen(5))
    noise = torch.randn(2, 4, 3, 2, 2, generator=_gen(6))
    out = get_sampler(name)(point_oracle(x0), noise, get_sigmas(8, shift))
    assert out.shape == x0.shape
    assert torch.allclose(out, x0, atol=1e-4)


def test_euler_many_steps_matches_gaussian() -> None:
    z = _noise()
    out = sample_euler(gaussian_oracle, z, get_sigmas(200, 1.0))
    # in 1-D the ODE transports N(0, 1) to N(MU, STD^2) by the monotone map MU + STD * z
    assert (out - (MU + STD * z)).abs().max() < 0.03
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(STD, abs=0.02)


def test_heun_fewer_steps_matches_gaussian() -> None:
    z = _noise()
    out = sample_heun(gaussian_oracle, z, get_sigmas(20, 1.0))
    assert (out - (MU + STD * z)).abs().max() < 0.02
    assert float(out.mean()) == pytest.approx(MU, abs=0.02)
    assert float(out.std()) == pytest.approx(STD, abs=0.02)
    euler = sample_euler(gaussian_oracle, z, get_sigmas(20, 1.0))
    assert (euler - (MU + STD * z)).abs().max() > 5 * (out - (MU + STD * z)).abs().max()


@pytest.mark.parametrize(("sampler", "order"), [(sample_euler, 1), (sample_heun, 2)])
def test_convergence_order(sampler: flow.Sampler, order: int) -> None:
    z = _noise(512).double()
    exact = MU + STD * z
    errs = [(sampler(gaussian_oracle, z, get_sigmas(n, 1.0).double()) - exact).abs().max() for n in (20, 40)]
    ratio = float(errs[0] / errs[1])
    assert 2**order * 0.75 < ratio < 2**order * 1.3


def test_unipc_matches_gaussian() -> None:
    z = _noise()
    out = sample_unipc(gaussian_oracle, z, get_sigmas(40, 1.0))
    assert (out - (MU + STD * z)).abs().max() < 0.02
    assert float(out.std()) == pytest.approx(STD, abs=0.02)


def test_flow_euler_diffusers_equals_euler() -> None:
    z = _noise(256)
    sigmas = get_sigmas(12, 5.0)
    ours = sample_euler(gaussian_oracle, z, sigmas)
    theirs = sample_flow_euler_diffusers(gaussian_oracle, z, sigmas)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_diffusers_samplers_agree_with_euler_on_oracle() -> None:
    x0 = torch.randn(2, 4, 3, 2, 2, generator=_gen(7))
    noise = torch.randn(2, 4, 3, 2, 2, generator=_gen(8))
    sigmas = get_sigmas(10, 3.0)
    outs = {name: SAMPLERS[name](point_oracle(x0), noise, sigmas) for name in SAMPLERS}
    for name, out in outs.items():
        assert torch.allclose(out, outs["euler"], atol=1e-4), name


class _Recorder:
    def __init__(self, inner: flow.Denoiser) -> None:
        self.inner, self.ts = inner, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.ts.append(float(t[0]))
        return self.inner(x, t)


@pytest.mark.parametrize("name", ["unipc", "flow_euler"])
def test_diffusers_samplers_use_given_sigmas(name: str) -> None:
    sigmas = get_sigmas(7, 5.0)
    rec = _Recorder(gaussian_oracle)
    get_sampler(name)(rec, _noise(4), sigmas)
    # UniPC nudges a leading 1.0 to 1 - 1e-6; otherwise the schedule is used as given (no second shift)
    assert torch.allclose(torch.tensor(rec.ts), sigmas[:-1], atol=1e-5)


def test_sampler_from_loaded_scheduler_does_not_reshift(tmp_path) -> None:
    sched = make_scheduler("unipc", 20, shift=5.0)
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = load_scheduler(str(tmp_path))
    assert type(loaded).__name__ == "UniPCMultistepScheduler"
    assert loaded.config.flow_shift == 5.0 and loaded.config.prediction_type == "flow_prediction"
    assert loaded.config.use_flow_sigmas
    sigmas = get_sigmas(9, 5.0)
    rec = _Recorder(gaussian_oracle)
    z = _noise(64)
    out = sampler_from_scheduler(loaded)(rec, z, sigmas)
    assert torch.allclose(torch.tensor(rec.ts), sigmas[:-1], atol=1e-5)
    assert torch.allclose(out, sample_unipc(gaussian_oracle, z, sigmas), atol=1e-6)


def test_make_scheduler() -> None:
    euler = make_scheduler("flow_euler", 10, shift=3.0)
    assert euler.config.shift == 3.0 and len(euler.timesteps) == 10
    assert float(euler.sigmas[-1]) == 0.0
    with pytest.raises(ValueError, match="unipc"):
        make_scheduler("ddim", 10, 3.0)


def test_callback_and_progress() -> None:
    x0 = torch.randn(2, 1, 1, 2, 2, generator=_gen(9))
    for name, sampler in SAMPLERS.items():
        seen: list[int] = []

        def cb(i: int, x: torch.Tensor, denoised: torch.Tensor, seen: list[int] = seen) -> None:
            seen.append(i)
            assert torch.allclose(denoised, x0, atol=1e-5)  # the oracle's x0 prediction is exact

        sampler(point_oracle(x0), torch.randn(2, 1, 1, 2, 2, generator=_gen(10)), get_sigmas(5), callback=cb)
        assert seen == list(range(5)), name
    sample_euler(point_oracle(x0), torch.randn_like(x0), get_sigmas(3), disable_progress=False)


def test_heun_skips_model_at_zero() -> None:
    rec = _Recorder(point_oracle(torch.zeros(1, 1, 1, 1, 1)))
    sample_heun(rec, torch.ones(1, 1, 1, 1, 1), get_sigmas(4, 1.0))
    assert len(rec.ts) == 2 * 4 - 1 and 0.0 not in rec.ts


def test_get_sampler_and_bad_sigmas() -> None:
    assert get_sampler("euler") is sample_euler
    assert set(SAMPLERS) == {"euler", "heun", "unipc", "flow_euler", "distilled"}
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*euler"):
        get_sampler("dpm")
    with pytest.raises(ValueError, match="descending"):
        sample_euler(gaussian_oracle, _noise(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="ends at 0"):
        sample_unipc(gaussian_oracle, _noise(2), torch.tensor([1.0, 0.5]))


def test_infer_shift_fallback() -> None:
    assert samplers._infer_shift(get_sigmas(12, 5.0)) == pytest.approx(5.0, rel=1e-4)
    with pytest.raises(ValueError):
        samplers._infer_shift(torch.tensor([1.0, 0.9, 0.1, 0.0]))


# --------------------------------------------------------------------------- guidance


def test_cfg_denoiser() -> None:
    calls = {"cond": 0, "uncond": 0}

    def cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["cond"] += 1
        return torch.full_like(x, 2.0)

    def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["uncond"] += 1
        return torch.full_like(x, 1.0)

    x, t = torch.zeros(2, 1, 1, 1, 1), torch.ones(2)
    sample_euler(cfg_denoiser(cond, uncond, 1.0), x, get_sigmas(4))
    assert calls == {"cond": 4, "uncond": 0}
    out = cfg_denoiser(cond, uncond, 5.0)(x, t)
    assert torch.allclose(out, torch.full_like(x, 1.0 + 5.0 * (2.0 - 1.0)))
    assert calls == {"cond": 5, "uncond": 1}


@pytest.mark.parametrize("name", ["unipc", "flow_euler"])
def test_diffusers_samplers_dense_schedule(name: str) -> None:
    """1500 steps: UniPC's integer timesteps repeat; stepping must go by position, not by lookup."""
    x0 = torch.randn(2, 1, 1, 1, 2, generator=_gen(11))
    out = get_sampler(name)(
        point_oracle(x0), torch.randn(2, 1, 1, 1, 2, generator=_gen(12)), get_sigmas(1500, 1.0)
    )
    assert torch.allclose(out, x0, atol=1e-4)
