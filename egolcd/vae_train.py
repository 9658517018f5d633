"""Train the embedded video VAE (a small ``AutoencoderKLWan``) on egocentric footage.

The Wan VAE is used as is at real scale; the embedded default needs its own small VAE, trained here
with the usual objective: ``rec(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I))`` with ``rec`` L1 or MSE and
``z`` a posterior sample or its mean, on random crops of ``4k + 1`` frames. At the end the per-channel
latent mean/std are measured on the data and written into the config (``latents_mean``/``latents_std``),
so the DiT sees unit-scale latents, exactly as with Wan's statistics.

Long runs are resumable: every ``checkpoint_every`` steps the model, the optimizer, the schedule and the
random state (one seeded generator draws the crops and the posterior samples) are written atomically to
``OUT/checkpoint/`` (safetensors + JSON); ``resume=True`` continues from there, bit for bit, and the folder
is removed once the finished VAE is saved.

Both cores (or many GPUs): the small VAE does not get faster with more threads (its convolutions run on a
few frames at a time), so ``torchrun --nproc_per_node 2 -m egolcd train-vae ... --threads 1`` (with
``ACCELERATE_USE_CPU=1`` on CPU) trains in two processes: each takes its half of every global batch of
``batch_size`` crops (drawn by one generator seeded alike in every process) and the gradients are averaged
before the step, so any process count takes the same steps as one process (up to float summation order;
with ``posterior="sample"`` the noise is drawn per process, so only the default ``"mode"`` is exact), and a
checkpoint resumes with another count. ``precision="bf16"`` runs the encoder and decoder under bf16
autocast (weights, optimizer and loss stay float32).

The defaults are the v2 demo VAE's recipe (benchmarks/NOTES.md, 2026-12-03 fourth session): 13-frame crops (so
groups after the first are trained reading a cached group, as when a long video is encoded), MSE on the
posterior mean, cosine schedule, 6,000 steps of 2 crops at lr 1e-3: 24.6 dB on held-out tours, 48 min on 1 core.
The embedded (v3) demo VAE takes the same settings with ``--batch-size 4 --steps 8000`` on two processes: 26.78 dB,
62 min (egolcd/assets/demo/README.md).

    egolcd train-vae DATA --out models/demo-vae --preset demo --crop-size 32 --chunks-per-clip 26 --threads 1
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import VAE_TRAIN_CHOICES, get_preset
from .vae import VideoVAE, embedded_vae_config

logger = logging.getLogger(__name__)


@dataclass
class VAETrainConfig:
    """Args: data: EgoVid-format dataset root; out: output folder (diffusers layout); preset: sizes;
    steps, batch_size, lr, kl_weight: optimisation; crop_frames: frames per training crop (4k + 1);
    max_clips: limit the clips loaded into memory; chunks_per_clip: clip length
    (as in the DiT's dataset); seed: everything random; crop_size: train on random square crops of this
    many pixels (the VAE is convolutional: 32x32 crops cost a quarter of 64x64 frames; ``None``: whole
    frames); threads: torch CPU threads (``None``: torch's default); init: a trained VAE folder to continue
    from; decoder_only: train only the decoder (``post_quant_conv`` + ``decoder``) on the frozen encoder's
    posterior means, keeping the latent statistics, so latents already cached (and a DiT trained on them)
    stay valid while reconstructions sharpen; latent_channels, base_dim: a new VAE with this many latent
    channels (``z_dim``) or this base width instead of the preset's (a DiT then needs as many input
    channels: ``create-model --vae`` of the result); loss: ``"l1"`` or ``"mse"`` (PSNR's own error);
    posterior: decode a ``"sample"`` of q(z|x) or its ``"mode"`` (the mean, which is what the DiT's latents
    are); lr_schedule: ``"constant"`` after a 100-step warm-up, or ``"cosine"`` down to 10% of ``lr`` at
    ``steps``; checkpoint_every: steps between resumable checkpoints (``0``: none); resume: continue from
    ``OUT/checkpoint/`` (an error when the run's settings differ from the checkpoint's); precision:
    ``"fp32"`` or ``"bf16"`` (autocast around the encoder and decoder). ``batch_size`` is the global batch:
    with several processes each takes ``batch_size / processes`` crops of it."""

    data: str
    out: str
    preset: str = "demo"
    steps: int = 6000
    batch_size: int = 2
    lr: float = 1e-3
    kl_weight: float = 1e-6
    crop_frames: int = 13
    max_clips: int | None = None
    chunks_per_clip: int = 4
    seed: int = 0
    log_every: int = 50
    crop_size: int | None = None
    threads: int | None = None
    init: str | None = None
    decoder_only: bool = False
    latent_channels: int | None = None
    base_dim: int | None = None
    loss: str = "mse"
    posterior: str = "mode"
    lr_schedule: str = "cosine"
    checkpoint_every: int = 500
    resume: bool = False
    precision: str = "fp32"


#: Settings that may change when a run is resumed (how long, how fast, how often to report or save).
_RESUMABLE = ("steps", "threads", "log_every", "checkpoint_every", "resume")


def _clip_config(config: VAETrainConfig):
    """The dataset's ``EgoVidConfig`` (no I/O): its ``num_frames`` is every loaded clip's length."""
    from .data import build_from_preset

    return build_from_preset(config.preset, config.data, max_clips=config.max_clips,
                             chunks_per_clip=config.chunks_per_clip)


def _load_clips(config: VAETrainConfig) -> torch.Tensor:
    """All clips decoded once: uint8 ``(N, 3, T, H, W)`` (small sim datasets fit in memory)."""
    from .data import EgoVidDataset

    dataset = EgoVidDataset(_clip_config(config))
    clips = []
    for i in tqdm(range(len(dataset)), desc="decoding clips", unit="clip"):
        video = dataset[i]["video"]  # (3, T, H, W) in [-1, 1]
        clips.append(((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(clips)


def _batch(
    clips: torch.Tensor, size: int, frames: int, g: torch.Generator, crop: int | None = None
) -> torch.Tensor:
    n, _, t, h, w = clips.shape
    idx = torch.randint(0, n, (size,), generator=g)
    starts = torch.randint(0, t - frames + 1, (size,), generator=g)
    crop_h, crop_w = (h, w) if crop is None else (min(crop, h), min(crop, w))
    ys = torch.randint(0, h - crop_h + 1, (size,), generator=g)
    xs = torch.randint(0, w - crop_w + 1, (size,), generator=g)
    crops = torch.stack([
        clips[i, :, s : s + frames, y : y + crop_h, x : x + crop_w]
        for i, s, y, x in zip(idx.tolist(), starts.tolist(), ys.tolist(), xs.tolist())
    ])
    return crops.float() / 127.5 - 1.0  # (B, 3, frames, crop_h, crop_w)


def _lr_lambda(config: VAETrainConfig):
    warmup = 100

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, config.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check(config: VAETrainConfig) -> None:
    # 4k + 1 whatever the VAE's temporal factor: diffusers' AutoencoderKLWan.encode reads 4 frames at a time
    if config.crop_frames < 1 or (config.crop_frames - 1) % 4:
        raise ValueError(f"crop_frames must be 4k + 1, got {config.crop_frames}")
    for name in ("latent_channels", "base_dim"):
        value = getattr(config, name)
        if value is not None and (value < 1 or config.init is not None):
            raise ValueError(f"{name} must be a positive integer for a new VAE (not with init), got {value}")
    for name, allowed in VAE_TRAIN_CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    world = _world()[1]
    if config.batch_size < 1 or config.batch_size % world:
        raise ValueError(f"batch_size must be a positive multiple of the {world} processes, got {config.batch_size}")
    if config.steps < 1 or config.checkpoint_every < 0:
        raise ValueError(f"steps must be >= 1 and checkpoint_every >= 0, got {config.steps}, {config.checkpoint_every}")
    clip_frames = _clip_config(config).num_frames
    if clip_frames < config.crop_frames:
        raise ValueError(f"the clips hold {clip_frames} frames, fewer than crop_frames={config.crop_frames}; "
                         "raise chunks_per_clip or lower crop_frames")


def _world() -> tuple[int, int]:
    """(this process's rank, the process count) from the launcher's environment (torchrun: ``RANK``,
    ``WORLD_SIZE``); (0, 1) in a plain run."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _join_processes(device: str) -> None:
    """Join the launcher's process group (gloo on CPU) once, through accelerate."""
    if _world()[1] > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=torch.device(device).type == "cpu")


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Every process's gradients replaced by their mean over the processes (one flat all-reduce)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _save_checkpoint(
    folder: Path, step: int, config: VAETrainConfig, model, opt, sched, g: torch.Generator
) -> None:
    """``folder`` replaced atomically: written to ``.tmp``, flushed, renamed."""
    from .training.checkpoint import capture_rng, fsync_tree, optimizer_to_tensors, save_tensors

    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)  # as VideoVAE does, without its eval()
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    save_tensors(tmp / "optimizer.safetensors", tensors, meta)
    rng, rng_meta = capture_rng(g)
    save_tensors(tmp / "rng.safetensors", rng, rng_meta)
    state = {"step": step, "config": asdict(config), "scheduler": sched.state_dict()}
    (tmp / "vae_train_state.json").write_text(json.dumps(state, indent=1))
    fsync_tree(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, config: VAETrainConfig, device: str):
    """(model, optimizer state, scheduler state, step) of ``folder``; the rng states are restored later."""
    from .training.checkpoint import optimizer_from_file

    try:
        state = json.loads((folder / "vae_train_state.json").read_text())
        saved = state["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot resume: {folder} is not a readable VAE training checkpoint ({exc})") from None
    mine = asdict(config)
    defaults = asdict(VAETrainConfig(data="", out=""))  # settings a checkpoint predates were their defaults
    differ = sorted(k for k in mine if k not in _RESUMABLE and saved.get(k, defaults[k]) != mine[k])
    if differ:
        raise ValueError(
            "cannot resume: the run's settings differ from the checkpoint's: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in differ)
        )
    model = VideoVAE.from_pretrained(folder).model.to(device=device, dtype=torch.float32)
    opt_state = optimizer_from_file(folder / "optimizer.safetensors", torch.device(device))
    return model, opt_state, state["scheduler"], int(state["step"])


def train_vae(config: VAETrainConfig, device: str = "cpu") -> Path:
    """Train, measure latent statistics, save. Returns the output folder."""
    _join_processes(device)
    rank, world = _world()
    _check(config)
    out = Path(config.out)
    ckpt_dir = out / "checkpoint"
    resuming = config.resume and (ckpt_dir / "vae_train_state.json").is_file()
    if config.resume and not resuming:
        logger.info("no checkpoint in %s: starting from step 0", ckpt_dir)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    preset = get_preset(config.preset)
    start, opt_state, sched_state = 0, None, None
    if resuming:
        model, opt_state, sched_state, start = _load_checkpoint(ckpt_dir, config, device)
        logger.info("resuming the VAE from %s at step %d", ckpt_dir, start)
    elif config.init is not None:
        model = VideoVAE.from_pretrained(config.init).model.to(device=device, dtype=torch.float32)
    else:
        if config.decoder_only:
            raise ValueError("decoder_only needs init (a trained VAE whose encoder is kept)")
        vae_config = embedded_vae_config(preset, config.latent_channels)
        if config.base_dim is not None:
            vae_config.update(base_dim=int(config.base_dim))
        model = VideoVAE.from_config_dict(vae_config, seed=config.seed).model.to(device)
    clips = _load_clips(config)
    logger.info("training the %s VAE on %d clips of %s", config.preset, len(clips), tuple(clips.shape[2:]))
    model.train().requires_grad_(not config.decoder_only)
    if config.decoder_only:
        model.encoder.eval()
        for part in (model.post_quant_conv, model.decoder):
            part.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
    g = torch.Generator().manual_seed(config.seed)
    if resuming:
        from .training.checkpoint import restore_rng

        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
        restore_rng(ckpt_dir / "rng.safetensors", g)
    rec_error = (lambda r, x: (r - x).abs().mean()) if config.loss == "l1" else (lambda r, x: (r - x).square().mean())
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    local = config.batch_size // world
    if world > 1:
        logger.info("process %d of %d: %d of every %d crops", rank, world, local, config.batch_size)
    bar = tqdm(range(start, config.steps), desc="vae", unit="step", initial=start, total=config.steps,
               disable=rank > 0)
    t0 = time.perf_counter()
    for step in bar:
        # every process draws the global batch from the same generator and keeps its own slice
        x = _batch(clips, config.batch_size, config.crop_frames, g, config.crop_size)[rank * local : (rank + 1) * local]
        x = x.to(device)  # (local, 3, crop_frames, crop, crop)
        if config.decoder_only:
            with torch.no_grad(), autocast:
                posterior = model.encode(x).latent_dist
            with autocast:
                rec = model.decode(posterior.mode()).sample  # the DiT's latents are posterior means
            err = rec_error(rec.float(), x)
            kl = torch.zeros(())
            loss = err
        else:
            with autocast:
                posterior = model.encode(x).latent_dist
                z = posterior.mode() if config.posterior == "mode" else posterior.sample(generator=g)
                rec = model.decode(z).sample
            err = rec_error(rec.float(), x)
            kl = posterior.kl().float().mean() / x[0].numel()
            loss = err + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        report = step % config.log_every == 0 or step == config.steps - 1
        if report and world > 1:  # report the global batch's error, not the first process's share
            err = err.detach().clone()
            torch.distributed.all_reduce(err)
            err /= world
        if report and rank == 0:
            bar.set_postfix({config.loss: f"{err.item():.4f}", "kl": f"{kl.item():.3g}"})
            logger.info("vae step %d %s %.4f kl %.4g lr %.3g (%.1f s)", step, config.loss, err.item(), kl.item(),
                        sched.get_last_lr()[0], time.perf_counter() - t0)
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            if rank == 0:
                _save_checkpoint(ckpt_dir, done, config, model, opt, sched, g)
            _barrier(world)
    model.eval().requires_grad_(False)
    if rank == 0:  # the first process measures the statistics and saves; the others wait for it
        _save_vae(model, clips, config, device)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    _barrier(world)
    return out


def _save_vae(model, clips: torch.Tensor, config: VAETrainConfig, device: str) -> None:
    """Save the trained VAE to ``config.out``, with the latent statistics measured on the data (a decoder-only
    run keeps the init's: its encoder is unchanged)."""
    out = Path(config.out)
    if config.decoder_only:
        VideoVAE(model.cpu()).save_pretrained(out)
        logger.info("saved VAE (decoder fine-tuned) to %s", out)
        return
    # Latent statistics over the data (posterior means of whole clips)
    with torch.no_grad():
        zs = []
        for i in range(min(len(clips), 16)):
            frames = min(clips.shape[2], 45) - (min(clips.shape[2], 45) - 1) % 4
            x = clips[i : i + 1, :, :frames].float().to(device) / 127.5 - 1.0
            zs.append(model.encode(x).latent_dist.mode().transpose(0, 1).flatten(1))  # (C, L*h*w)
        z = torch.cat(zs, dim=1)
        mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-3)
    model.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    VideoVAE(model.cpu()).save_pretrained(out)
    logger.info("saved VAE to %s (latent mean %s, std %s)", out, mean.numpy().round(3), std.numpy().round(3))
