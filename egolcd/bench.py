"""Speed and memory of the chunk loop under each memory policy (``egolcd bench``).

For each policy, N chunks are generated with the preset's sizes and random weights through the same
``generate_chunk`` the pipeline runs (read memory -> denoise -> clean pass -> write memory; the VAE is
left out: its cost per chunk does not depend on the policy). Each policy runs in its own process, so
peak RSS is per policy. Per chunk: wall seconds, context tokens per layer, memory bytes (window + sink +
long-term store); per policy: peak RSS (CPU) or peak CUDA memory.

Flatness target (bounded cost at any length): for ``egolcd``, median seconds of the last 8 chunks over
the median of chunks 4-11 <= 1.15; ``dense`` grows with length.

Throughput: pixel frames per second (``vae_temporal * chunk_frames`` pixel frames per chunk, VAE
excluded) over the steady state (last 8 chunks), and the fraction of the device's measured matmul peak
(``mfu``): matmul FLOPs per chunk are counted analytically (``chunk_flops``) at the last chunk's context
size, the peak is measured once per run with a large matmul in the bench dtype (``bench_matmul_peak``).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MEMORY_POLICIES, MemoryConfig, get_preset

logger = logging.getLogger(__name__)

FLATNESS_TARGET = 1.15
POLICY_RATIO_TARGET = 1.08  # egolcd / sink-window at the same window and sink (issue 17; MemFlow reports 1.079)


@dataclass
class BenchConfig:
    """Args: preset: sizes; chunks: chunks per policy; policies: names; device: cpu or cuda; steps:
    sampling steps per chunk; height, width: pixel size (default: the preset's); dtype: float32 or
    bfloat16; seed; threads: CPU threads (``None``: PyTorch's default; 1 avoids oversubscription
    stalls on small, busy machines); compile: ``torch.compile`` the transformer blocks (regional,
    dynamic shapes); offload: keep the long-term store's keys/values in CPU memory; text_tokens: prompt
    length (512 for umT5 in Wan2.1); repeats: run the whole sequence this many times (same seeds, same
    work) and keep each chunk's fastest time, so a load burst on a shared machine does not pass for
    growth with length (with one process per policy, the policies take turns chunk by chunk, so it does
    not pass for a policy's cost either); importance_stride: ``MemoryConfig.importance_query_stride``;
    arena: preallocated context buffers (``False``: concatenate new tensors every step, the training
    path; for side-by-side comparison); fast_path: the transformer's inference fast path (per-prompt
    cross-attention cache, fused elementwise kernels, one-pass importance, arena reuse; ``False``: the
    plain path, for side-by-side comparison)."""

    preset: str = "tiny"
    chunks: int = 64
    policies: tuple[str, ...] = MEMORY_POLICIES
    device: str = "cpu"
    steps: int = 4
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    seed: int = 0
    segments: int = 8
    threads: int | None = None
    compile: bool = False
    offload: bool = False
    text_tokens: int = 32
    arena: bool = True
    importance_stride: int = 1
    repeats: int = 1
    fast_path: bool = True


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_flops(
    cfg: Any, tokens: int, context: int, text_tokens: int, attention_mass: bool = False, mass_stride: int = 1,
    prompt_cached: bool = False,
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one ``forward_chunk`` of the transformer.

    Args:
        cfg: the transformer config (Wan keys). tokens: current-chunk tokens N. context: memory tokens
            per layer. text_tokens: prompt tokens L. attention_mass: also count the importance pass (over
            every ``mass_stride``-th query; q @ k^T over the context keys only, the inference fast path's
            ``attention_and_mass``). prompt_cached: the text projection and cross-attention keys/values
            come from a ``PromptCache`` (made once per segment, not counted per forward).
    """
    d = cfg.num_attention_heads * cfg.attention_head_dim
    n, t, length = tokens, context + tokens, text_tokens
    patch = math.prod(cfg.patch_size)
    per_layer = (
        4 * 2 * n * d * d  # self-attention q, k, v, out projections
        + 2 * 2 * n * t * d  # q @ k^T and probs @ v over [context + current]
        + 2 * 2 * n * d * d  # cross-attention q, out
        + (0 if prompt_cached else 2 * 2 * length * d * d)  # cross-attention k, v over the text
        + 2 * 2 * n * d * cfg.ffn_dim  # feed-forward
        + (2 * -(-n // mass_stride) * context * d if attention_mass else 0)  # importance: q @ k_ctx^T
    )
    embed = (
        2 * n * cfg.in_channels * patch * d  # patch embedding
        + (0 if prompt_cached else 2 * length * (cfg.text_dim * d + d * d))  # text projection (2 linears)
        + 2 * n * d * cfg.out_channels * patch  # output projection
    )
    return cfg.num_layers * per_layer + embed


def chunk_flops(
    cfg: Any, tokens: int, context: int, text_tokens: int, steps: int, attention_mass: bool, mass_stride: int = 1,
    prompt_cached: bool = False,
) -> int:
    """FLOPs of one chunk: ``steps`` denoising forwards and the clean (memory-write) pass."""
    denoise = steps * forward_flops(cfg, tokens, context, text_tokens, prompt_cached=prompt_cached)
    return denoise + forward_flops(cfg, tokens, context, text_tokens, attention_mass, mass_stride, prompt_cached)


def measure_matmul_peak(device: str, dtype: torch.dtype, size: int | None = None, reps: int = 10) -> float:
    """Achieved FLOP/s of a large square matmul: the device's practical peak for this dtype."""
    size = size or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def bench_matmul_peak(config: BenchConfig) -> float:
    """``measure_matmul_peak`` for a bench configuration (its device, dtype and CPU threads), measured
    once per benchmark run so every policy's MFU shares one denominator."""
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return measure_matmul_peak(config.device, getattr(torch, config.dtype))
    finally:
        torch.set_num_threads(threads)


def mfu(result: dict[str, Any], peak_flops: float) -> float:
    """Fraction of ``peak_flops`` a ``run_policy`` result achieved in its steady state (last 8 chunks)."""
    return result["flops_per_chunk"] / statistics.median(result["chunk_seconds"][-8:]) / peak_flops


@dataclass
class _Pass:
    """One pass under way (``begin_pass`` .. ``end_pass``): its memory, seeded inputs and per-chunk records."""

    policy: Any
    state: Any
    g: torch.Generator
    texts: torch.Tensor  # (segments, 1, text_tokens, text_dim)
    keys: torch.Tensor  # (segments, 1, 64), unit norm
    arena: Any
    prompts: dict[int, Any] = field(default_factory=dict)  # per segment, made at its first chunk (as the pipeline)
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    mem_bytes: list[int] = field(default_factory=list)


class PolicyRun:
    """One policy's chunk loop, set up once (random weights, sizes, sampler) and run as whole passes.

    Args:
        config: the bench settings.
        policy_name: one of ``MEMORY_POLICIES``.
    """

    def __init__(self, config: BenchConfig, policy_name: str) -> None:
        from .flow import get_sampler, get_sigmas
        from .pipeline import compile_transformer
        from .transformer import EgoLCDTransformer3DModel

        self.config, self.policy_name = config, policy_name
        self.preset = preset = get_preset(config.preset)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device, dtype = config.device, getattr(torch, config.dtype)
        torch.manual_seed(config.seed)
        model = EgoLCDTransformer3DModel.from_preset(config.preset).to(device=self.device).eval()
        model.fast_path = config.fast_path
        if dtype != torch.float32:
            model = model.to_dtype(dtype)
        if config.compile:
            compile_transformer(model)
        self.model, self.dtype = model, dtype
        self.k = preset.chunk_frames
        height, width = config.height or preset.height, config.width or preset.width
        self.latent_hw = (height // preset.vae_spatial, width // preset.vae_spatial)
        self.memory = MemoryConfig(
            **{**asdict(preset.memory), "offload_long_term": "cpu" if config.offload else None,
               "importance_query_stride": config.importance_stride}
        )
        self.n_tokens = model.tokens_per_chunk(*self.latent_hw)
        self.sigmas = get_sigmas(config.steps, 5.0)
        self.sample = get_sampler("euler")
        self.policy: Any = None
        self.arena: Any = None
        self.tokens: list[int] | None = None
        self.mem_bytes: list[int] | None = None
        self.passes: list[list[float]] = []  # per pass, per chunk seconds
        self._pass: _Pass | None = None  # the pass under way (begin_pass .. end_pass)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def one_pass(self) -> list[float]:
        """The whole run from an empty memory, seeded the same every time: per-chunk seconds (kept in
        ``passes``; context tokens and memory bytes are kept too, and must be the same in every pass)."""
        self.begin_pass()
        for _ in range(self.config.chunks):
            self.step()
        return self.end_pass()

    def begin_pass(self) -> None:
        """Start a pass: an empty memory, the seeded prompts and noise (``step`` then runs one chunk)."""
        from .memory import ContextArena, MemoryPolicy

        config, model, device = self.config, self.model, self.device
        policy = MemoryPolicy.from_name(self.policy_name, self.k, self.memory)
        g = torch.Generator().manual_seed(config.seed)
        texts = torch.randn(config.segments, 1, config.text_tokens, model.config.text_dim, generator=g)
        keys = torch.nn.functional.normalize(torch.randn(config.segments, 1, 64, generator=g), dim=-1).to(device)
        self._pass = _Pass(
            policy=policy, state=policy.init_state(), g=g, texts=texts.to(device, self.dtype), keys=keys,
            arena=ContextArena(reserve=self.n_tokens, reuse=config.fast_path) if config.arena else None,
        )

    @torch.inference_mode()
    def step(self) -> float:
        """One chunk of the current pass (read memory, denoise, clean pass, write memory): its seconds."""
        from .pipeline import generate_chunk

        config, model, device, k, run = self.config, self.model, self.device, self.k, self._pass
        assert run is not None, "begin_pass first"
        c = len(run.seconds)
        seg = c * config.segments // config.chunks
        noise = torch.randn((1, self.preset.latent_channels, k, *self.latent_hw), generator=run.g)
        noise = noise.to(device, self.dtype)
        prompts = run.prompts
        _sync(device)
        t0 = time.perf_counter()
        if seg not in prompts:
            prompts[seg] = model.prompt_cache(run.texts[seg]) if config.fast_path else run.texts[seg]
        _, ctx = generate_chunk(
            model, run.policy, run.state, noise, prompts[seg], run.keys[seg], seg, [], self.sigmas,
            self.sample, arena=run.arena,
        )
        _sync(device)
        seconds = time.perf_counter() - t0
        run.seconds.append(seconds)
        run.tokens.append(ctx.tokens_per_layer)
        run.mem_bytes.append(run.state.nbytes)
        return seconds

    def end_pass(self) -> list[float]:
        """Finish the pass: check it did the same work as the first, keep its per-chunk seconds."""
        run = self._pass
        assert run is not None, "begin_pass first"
        seconds, tokens, mem_bytes = run.seconds, run.tokens, run.mem_bytes
        if self.tokens is not None and (tokens != self.tokens or mem_bytes != self.mem_bytes):
            # same seeds, same work: or it is a bug
            raise RuntimeError(f"bench: pass of {self.policy_name} differs from the first (non-deterministic memory)")
        self.tokens, self.mem_bytes, self.policy, self.arena = tokens, mem_bytes, run.policy, run.arena
        self.passes.append(seconds)
        self._pass = None
        return seconds

    def result(self) -> dict[str, Any]:
        """Per-chunk timings (each chunk's fastest pass so far), sizes, peak memory, throughput and FLOPs."""
        seconds = [min(times) for times in zip(*self.passes)]
        if self.device.startswith("cuda"):
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        steady = statistics.median(seconds[-8:])
        assert self.tokens is not None and self.mem_bytes is not None, "run one_pass first"
        flops = chunk_flops(
            self.model.config, self.n_tokens, self.tokens[-1], self.config.text_tokens, self.config.steps,
            self.policy.needs_attention_mass, self.policy.config.importance_query_stride,
            prompt_cached=self.config.fast_path,
        )
        return {
            "chunk_seconds": seconds, "context_tokens": self.tokens, "memory_bytes": self.mem_bytes,
            "pass_median_seconds": [statistics.median(p) for p in self.passes],
            "peak_mb": peak_mb,
            "frames_per_second": self.preset.vae_temporal * self.k / steady,
            "flops_per_chunk": flops,
            "arena_mb": self.arena.nbytes / 2**20 if self.arena else 0.0,
            "arena_reallocations": self.arena.reallocations if self.arena else 0,
        }


def run_policy(config: BenchConfig, policy_name: str) -> dict[str, Any]:
    """Generate ``config.chunks`` chunks under one policy, ``config.repeats`` passes in a row; per-chunk
    timings (each chunk's fastest pass) and sizes."""
    run = PolicyRun(config, policy_name)
    for _ in range(config.repeats):
        run.one_pass()
    return run.result()


# One PolicyRun per worker process (each process holds one policy, so its peak RSS is that policy's).
_RUN: PolicyRun | None = None


def _worker_start(config: BenchConfig, policy_name: str) -> None:
    global _RUN
    _RUN = PolicyRun(config, policy_name)


def _worker_begin() -> None:
    assert _RUN is not None
    _RUN.begin_pass()


def _worker_step() -> float:
    assert _RUN is not None
    return _RUN.step()


def _worker_end() -> None:
    assert _RUN is not None
    _RUN.end_pass()


def _worker_result() -> dict[str, Any]:
    assert _RUN is not None
    return _RUN.result()


def flatness(chunk_seconds: list[float]) -> float | None:
    """median(seconds of the last 8 chunks) / median(seconds of chunks 4-11); None if too short."""
    if len(chunk_seconds) < 20:
        return None
    return statistics.median(chunk_seconds[-8:]) / statistics.median(chunk_seconds[4:12])


def policy_ratio(results: dict[str, Any], policy: str = "egolcd", base: str = "sink-window") -> dict[str, Any] | None:
    """``policy``'s cost over ``base``'s: the ratio of their median chunk seconds (each chunk's fastest pass),
    and the same ratio paired pass by pass (the policies take turns chunk by chunk, so pass k of both met the
    same load): the geometric mean of the per-pass ratios of medians with a bootstrap 95% interval."""
    from .revisits import bootstrap_mean_ci

    if policy not in results or base not in results:
        return None
    a, b = results[policy], results[base]
    logs = [math.log(x / y) for x, y in zip(a["pass_median_seconds"], b["pass_median_seconds"])]
    mean, low, high = bootstrap_mean_ci(logs) if len(logs) > 1 else (logs[0], math.nan, math.nan)
    ratio = statistics.median(a["chunk_seconds"]) / statistics.median(b["chunk_seconds"])
    return {
        "policies": [policy, base], "ratio": ratio, "paired_per_pass": math.exp(mean),
        "paired_ci95": [math.exp(low), math.exp(high)], "passes": len(logs), "target": POLICY_RATIO_TARGET,
        # established: the ratio of bests is under the target and so is the paired interval's upper end
        "met": ratio <= POLICY_RATIO_TARGET,
        "established": ratio <= POLICY_RATIO_TARGET and math.exp(high) <= POLICY_RATIO_TARGET,
    }


def run_bench(config: BenchConfig, isolate: bool = True) -> dict[str, Any]:
    """All policies, each in a fresh process (``isolate``) so peak memory is its own."""
    if config.repeats < 1 or config.chunks < 1:
        raise ValueError(f"--chunks and --repeats must be >= 1, got {config.chunks} and {config.repeats}")
    for name in config.policies:
        if name not in MEMORY_POLICIES:
            raise ValueError(f"unknown memory policy {name!r}; choose from {', '.join(MEMORY_POLICIES)}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    results: dict[str, Any] = {}
    if isolate and not config.device.startswith("cuda"):
        # One process per policy, alive for the whole run, and the policies take turns chunk by chunk (chunk c
        # of every policy's pass r, then chunk c + 1, ...): the same chunk of two policies runs milliseconds
        # apart, so a load burst on a shared machine meets both alike (turns by whole passes let a burst
        # longer than a pass meet one policy: 0.73-1.33 between runs of one commit), and each chunk's
        # fastest pass rarely falls in one: the policy ratios are what the repeats protect.
        ctx = mp.get_context("spawn")
        pools = {name: ProcessPoolExecutor(max_workers=1, mp_context=ctx) for name in config.policies}
        try:
            for name, pool in pools.items():
                pool.submit(_worker_start, config, name).result()
            names = list(pools)
            for r in range(config.repeats):
                logger.info("bench: pass %d of %d, %d chunks of %s in turns (%s, %s)", r + 1, config.repeats,
                            config.chunks, ", ".join(names), config.preset, config.device)
                for pool in pools.values():
                    pool.submit(_worker_begin).result()
                for c in range(config.chunks):
                    turn = (r + c) % len(names)  # each chunk starts one policy later: none always goes first
                    for name in names[turn:] + names[:turn]:
                        pools[name].submit(_worker_step).result()
                for pool in pools.values():
                    pool.submit(_worker_end).result()
            for name, pool in pools.items():
                results[name] = pool.submit(_worker_result).result()
        finally:
            for pool in pools.values():
                pool.shutdown(cancel_futures=True)
    else:
        for name in config.policies:
            logger.info("bench: %s, %d chunks (%s, %s)", name, config.chunks, config.preset, config.device)
            results[name] = run_policy(config, name)
    for res in results.values():
        res["flatness"] = flatness(res["chunk_seconds"])
    peak_flops = bench_matmul_peak(config)
    for res in results.values():
        res["mfu"] = mfu(res, peak_flops)
    summary = {
        name: {
            "median_chunk_seconds": statistics.median(r["chunk_seconds"]),
            "flatness": r["flatness"],
            "max_context_tokens": max(r["context_tokens"]),
            "final_memory_bytes": r["memory_bytes"][-1],
            "peak_mb": r["peak_mb"],
            "frames_per_second": r["frames_per_second"],
            "mfu": r["mfu"],
        }
        for name, r in results.items()
    }
    ego = results.get("egolcd", {}).get("flatness")
    return {
        "preset": config.preset,
        "device": config.device if not config.device.startswith("cuda") else torch.cuda.get_device_name(),
        "dtype": config.dtype,
        "steps": config.steps,
        "chunks": config.chunks,
        "repeats": config.repeats,
        "size": [config.height or get_preset(config.preset).height, config.width or get_preset(config.preset).width],
        "compile": config.compile,
        "offload": config.offload,
        "torch_threads": config.threads or torch.get_num_threads(),
        "matmul_peak_tflops": peak_flops / 1e12,
        "policies": results,
        "summary": summary,
        "flatness_target": {"ratio": ego, "target": FLATNESS_TARGET, "met": None if ego is None else ego <= FLATNESS_TARGET},
        "policy_ratio": policy_ratio(results),
    }


def plot_bench(result: dict[str, Any], path: str | Path) -> None:
    """Seconds, context tokens and memory per chunk, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in result["policies"].items():
        x = range(len(r["chunk_seconds"]))
        axes[0].plot(x, r["chunk_seconds"], label=name)
        axes[1].plot(x, r["context_tokens"], label=name)
        axes[2].plot(x, [b / 2**20 for b in r["memory_bytes"]], label=name)
    for ax, title in zip(axes, ("seconds per chunk", "context tokens per layer", "memory (MiB)")):
        ax.set_title(title)
        ax.set_xlabel("chunk")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"egolcd bench: {result['preset']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    rows = [
        f"{'policy':<12} {'s/chunk':>9} {'frames/s':>9} {'MFU':>6} {'flatness':>9} {'ctx tok':>8} "
        f"{'mem MiB':>9} {'peak MB':>9}"
    ]
    for name, s in result["summary"].items():
        flat = "-" if s["flatness"] is None else f"{s['flatness']:.3f}"
        rows.append(
            f"{name:<12} {s['median_chunk_seconds']:>9.4f} {s['frames_per_second']:>9.2f} {s['mfu']:>6.1%} "
            f"{flat:>9} {s['max_context_tokens']:>8d} {s['final_memory_bytes'] / 2**20:>9.3f} {s['peak_mb']:>9.1f}"
        )
    return "\n".join(rows)


def bench_main(config: BenchConfig, json_path: str | None = None, plot_path: str | None = None) -> dict[str, Any]:
    from .video_io import check_writable_dir

    for out in (json_path, plot_path):
        if out:
            check_writable_dir(Path(out).resolve().parent)
    result = run_bench(config)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if plot_path:
        plot_bench(result, plot_path)
    return result
