"""egolcd against Self-Forcing's own ``CausalInferencePipeline`` (rolling KV cache), side by side on CPU.

The user supplies a local checkout of https://github.com/guandeh17/Self-Forcing (``--self-forcing PATH``);
this script never downloads anything and copies no code from it: it imports the peer from PATH.

One tiny random Wan model (``CausalWanModel`` of the checkout, seeded) is saved once in the peer's layout
and converted for egolcd with ``egolcd.convert.convert_state_dict`` (diffusers' rename table), so both
sides compute the same function; a first forward of the two is compared and its difference recorded.
Then every (side, policy) run is a fresh process, in alternating order round after round, so load on a
shared machine hits every side alike. egolcd's own policy ratio (egolcd / sink-window) is also read from a
run in which the two take turns chunk by chunk on one model (``egolcd-turns``), a few milliseconds apart:
separate runs leave it at the mercy of load that differs between runs. Each run generates ``--chunks`` chunks of ``--chunk-frames``
latent frames with 4 distilled steps plus the clean (KV-writing) pass, one thread, float32, and reports
per-chunk wall seconds; a run's figure is the median of its last ``--steady`` chunks, a side's figure the
median over rounds.

Policies (same window and sink on both sides):
  window       egolcd ``window`` (W past chunks)         vs the peer with local_attn_size = (W + 1) * K
  sink-window  egolcd ``sink-window`` (first chunk + W)   vs the peer with sink_size = K as well
  egolcd       egolcd's memory (window + sink + top_m retrieved sparse entries), compared with the
               peer's sink + window and with egolcd's own ``sink-window``

What the peer needs on CPU (shims, applied in its worker process only, printed in the JSON):
  * ``torch.cuda.current_device`` answers 0: the checkout calls it at import time (default arguments).
  * ``wan.modules.model.flash_attention`` and ``wan.modules.causal_model.attention`` are replaced by
    float32 ``scaled_dot_product_attention`` with the same (B, L, heads, d) layout: the checkout's own
    versions need CUDA flash-attn or cast to bfloat16.
  * a stub text encoder (returns the prompt embeddings given) and a stub VAE (returns the latents): the
    comparison is of the DiT chunk loop only, on both sides.
  * ``wan/__init__.py`` is not run (it imports the image-to-video/CLIP code and so torchvision, which the
    causal text-to-video path does not use); ``wan.modules`` and below import as usual.
  * Python packages the checkout imports that egolcd does not need: ``easydict`` and ``ftfy``
    (``pip install easydict ftfy``, or put them on PYTHONPATH).

    python benchmarks/peers/self_forcing.py --self-forcing ~/src/Self-Forcing --rounds 10 \\
        --out outputs/peer-self-forcing.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

POLICIES = ("window", "sink-window", "egolcd")
PEER_POLICIES = ("window", "sink-window")
STEP_LIST = [1000, 750, 500, 250]  # Self-Forcing's denoising_step_list
SHIFT = 5.0


def tiny_peer_config(args: argparse.Namespace) -> dict:
    return dict(
        model_type="t2v", patch_size=(1, 2, 2), text_len=args.text_tokens, in_dim=16, dim=args.dim,
        ffn_dim=args.dim * 4, freq_dim=256, text_dim=4096, out_dim=16, num_heads=args.heads,
        num_layers=args.layers, qk_norm=True, cross_attn_norm=True, eps=1e-6,
    )


# --------------------------------------------------------------------------- the peer, imported from PATH


def import_peer(path: str) -> dict:
    """Import the checkout's modules with the CPU shims above; returns them by name."""
    import torch.nn.functional as F

    torch.cuda.current_device = lambda: 0  # the checkout evaluates it at import time
    root = Path(path).resolve()
    sys.path.insert(0, str(root))
    # ``wan/__init__.py`` imports the image-to-video and CLIP code (torchvision), which the causal
    # text-to-video path never uses: register the package without running it; its submodules load as usual
    wan_pkg = types.ModuleType("wan")
    wan_pkg.__path__ = [str(root / "wan")]
    sys.modules.setdefault("wan", wan_pkg)
    try:
        import wan.modules.causal_model as causal_model
        import wan.modules.model as wan_model
        from pipeline.causal_inference import CausalInferencePipeline
        from utils.wan_wrapper import WanDiffusionWrapper
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"cannot import Self-Forcing from {path}: {exc}. The checkout also imports packages egolcd does "
            "not need (easydict, ftfy): pip install easydict ftfy"
        ) from None

    def sdpa(q, k, v, *args, **kwargs):  # (B, L, heads, d) in and out, float32, no padding masks
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    wan_model.flash_attention = sdpa  # text cross-attention
    causal_model.attention = sdpa  # self-attention over the KV cache
    return {
        "CausalWanModel": causal_model.CausalWanModel,
        "CausalInferencePipeline": CausalInferencePipeline,
        "WanDiffusionWrapper": WanDiffusionWrapper,
    }


class _StubText(torch.nn.Module):
    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds

    def forward(self, text_prompts):  # noqa: ARG002 - the peer's call signature
        return {"prompt_embeds": self.embeds}


class _StubVAE(torch.nn.Module):
    def decode_to_pixel(self, latent, use_cache=False):  # noqa: ARG002
        return latent


def peer_pipeline(peer: dict, work: Path, args: argparse.Namespace, policy: str, embeds: torch.Tensor):
    """The peer's ``CausalInferencePipeline`` on the tiny model, with window/sink as egolcd's policy."""
    k = args.chunk_frames
    local = (args.window + 1) * k
    sink = k if policy == "sink-window" else 0
    cwd = os.getcwd()
    os.chdir(work)  # the wrapper loads f"wan_models/{model_name}/"
    try:
        generator = peer["WanDiffusionWrapper"](
            model_name="tiny", timestep_shift=SHIFT, is_causal=True, local_attn_size=local + sink, sink_size=sink
        )
    finally:
        os.chdir(cwd)
    cfg = argparse.Namespace(
        denoising_step_list=STEP_LIST, warp_denoising_step=True, num_frame_per_block=k,
        independent_first_frame=False, context_noise=0, model_kwargs={},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        pipe = peer["CausalInferencePipeline"](cfg, "cpu", generator=generator, text_encoder=_StubText(embeds),
                                               vae=_StubVAE())
    h = w = args.latent_size // 2
    pipe.num_transformer_blocks = args.layers
    pipe.frame_seq_length = h * w
    heads, hd = args.heads, args.dim // args.heads
    # its _initialize_*_cache hard-code Wan 1.3B's 12 x 128 heads: the same caches at the tiny sizes
    size = pipe.local_attn_size * pipe.frame_seq_length
    pipe.kv_cache1 = [
        {"k": torch.zeros(1, size, heads, hd), "v": torch.zeros(1, size, heads, hd),
         "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])}
        for _ in range(args.layers)
    ]
    pipe.crossattn_cache = [
        {"k": torch.zeros(1, args.text_tokens, heads, hd), "v": torch.zeros(1, args.text_tokens, heads, hd),
         "is_init": False}
        for _ in range(args.layers)
    ]
    return pipe


def run_peer(args: argparse.Namespace, policy: str, work: Path) -> dict:
    peer = import_peer(args.self_forcing)
    embeds = load_file(work / "text.safetensors")["text"]
    pipe = peer_pipeline(peer, work, args, policy, embeds)
    k = args.chunk_frames
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(1, args.chunks * k, 16, args.latent_size, args.latent_size, generator=g)
    stamps: list[float] = []
    forward = pipe.generator.forward

    def timed(*a, **kw):  # a chunk ends with the clean pass (timestep == context_noise == 0)
        out = forward(*a, **kw)
        if not bool(kw["timestep"].any()):
            stamps.append(time.perf_counter())
        return out

    pipe.generator.forward = timed
    with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):  # it prints every step
        t0 = time.perf_counter()
        pipe.inference(noise, ["a prompt"])
    ends = [t0, *stamps]
    return {"chunk_seconds": [b - a for a, b in zip(ends, ends[1:])]}


# --------------------------------------------------------------------------- egolcd


def egolcd_stepper(args: argparse.Namespace, policy: str, work: Path, plain: bool = False, model=None):
    """One egolcd chunk loop set up (model, memory, arena, seeded noise and keys); returns ``step()``, which
    generates the next chunk and returns its wall seconds. ``model``: share one already loaded."""
    from egolcd.config import MemoryConfig
    from egolcd.flow import distilled_sigmas, get_sampler
    from egolcd.memory import ContextArena, MemoryPolicy
    from egolcd.pipeline import generate_chunk
    from egolcd.transformer import EgoLCDTransformer3DModel

    if model is None:
        model = EgoLCDTransformer3DModel.from_pretrained(work / "egolcd").eval()
    plain = plain or args.plain
    model.fast_path = not plain
    embeds = load_file(work / "text.safetensors")["text"]
    k = args.chunk_frames
    hw = args.latent_size
    memory = MemoryConfig(policy=policy, window_chunks=args.window, sink=True)
    mem_policy = MemoryPolicy(memory, k)
    state = mem_policy.init_state()
    arena = ContextArena(reserve=k * (hw // 2) ** 2, reuse=not plain)
    sigmas = distilled_sigmas(STEP_LIST, SHIFT)
    sample = get_sampler("distilled")
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(1, args.chunks * k, 16, hw, hw, generator=g).permute(0, 2, 1, 3, 4)
    # segments: one prompt embedding each (memory keys differ, so egolcd retrieves across segments);
    # the text token states are the peer's one prompt, made into a PromptCache once per segment
    keys = torch.nn.functional.normalize(torch.randn(args.segments, 1, 64, generator=g), dim=-1)
    prompts: dict[int, object] = {}
    chunk = [0]

    @torch.inference_mode()
    def step() -> float:
        c = chunk[0]
        seg = c * args.segments // args.chunks
        x = noise[:, :, c * k : (c + 1) * k].contiguous()
        t0 = time.perf_counter()
        if seg not in prompts:
            prompts[seg] = embeds if plain else model.prompt_cache(embeds)
        generate_chunk(model, mem_policy, state, x, prompts[seg], keys[seg], seg, [], sigmas, sample, arena=arena)
        chunk[0] += 1
        return time.perf_counter() - t0

    return step, model


def run_egolcd(args: argparse.Namespace, policy: str, work: Path, plain: bool = False) -> dict:
    step, _ = egolcd_stepper(args, policy, work, plain)
    return {"chunk_seconds": [step() for _ in range(args.chunks)]}


def run_egolcd_turns(args: argparse.Namespace, work: Path) -> dict:
    """egolcd's ``egolcd`` and ``sink-window`` in one process on one model, taking turns chunk by chunk (the
    first of each pair alternating): the same chunk of the two runs milliseconds apart, so load on a shared
    machine meets both alike. This is what the policy ratio is read from."""
    ego, model = egolcd_stepper(args, "egolcd", work)
    base, _ = egolcd_stepper(args, "sink-window", work, model=model)
    seconds: dict[str, list[float]] = {"egolcd": [], "sink-window": []}
    for c in range(args.chunks):
        pair = (("egolcd", ego), ("sink-window", base))
        for name, step in pair if c % 2 == 0 else pair[::-1]:
            seconds[name].append(step())
    return {"chunk_seconds": seconds}


# --------------------------------------------------------------------------- setup and the driver


def setup(args: argparse.Namespace, work: Path) -> dict:
    """Seeded tiny peer model saved in its layout; the same weights converted for egolcd; one prompt;
    the first forward of both compared."""
    from egolcd.convert import convert_state_dict, derive_config
    from egolcd.transformer import EgoLCDTransformer3DModel

    peer = import_peer(args.self_forcing)
    torch.manual_seed(args.seed)
    model = peer["CausalWanModel"](**tiny_peer_config(args)).eval()
    # Wan initialises the output head and some norms to zero/one; randomise every tensor so the check bites
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(work / "wan_models" / "tiny")
    state = convert_state_dict(model.state_dict())
    config = derive_config(state, num_heads=args.heads, head_dim=args.dim // args.heads, chunk_frames=args.chunk_frames)
    ours = EgoLCDTransformer3DModel(**config).eval()
    ours.load_state_dict(state, strict=True)
    ours.save_pretrained(work / "egolcd")
    g = torch.Generator().manual_seed(args.seed + 1)
    embeds = torch.randn(1, args.text_tokens, 4096, generator=g)
    save_file({"text": embeds}, work / "text.safetensors")
    # first forward, no cache: the same function?
    x = torch.randn(1, 16, args.chunk_frames, args.latent_size, args.latent_size, generator=g)
    with torch.inference_mode():
        pipe = peer_pipeline(peer, work, args, "window", embeds)
        t = torch.full((1, args.chunk_frames), 800, dtype=torch.long)
        peer_flow, _ = pipe.generator(
            noisy_image_or_video=x.permute(0, 2, 1, 3, 4), conditional_dict={"prompt_embeds": embeds}, timestep=t,
            kv_cache=pipe.kv_cache1, crossattn_cache=pipe.crossattn_cache, current_start=0,
        )
        ours_flow = ours.forward_chunk(x, t.float(), ours.prompt_cache(embeds)).sample
    diff = float((peer_flow.permute(0, 2, 1, 3, 4) - ours_flow).abs().max())
    return {"first_forward_max_abs_diff": diff, "output_abs_mean": float(ours_flow.abs().mean())}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = Path(args.work)
    if args.worker == "setup":
        result = setup(args, work)
    elif args.worker == "peer":
        result = run_peer(args, args.policy, work)
    elif args.worker == "egolcd-plain":
        result = run_egolcd(args, args.policy, work, plain=True)
    elif args.worker == "egolcd-turns":
        result = run_egolcd_turns(args, work)
    else:
        result = run_egolcd(args, args.policy, work)
    Path(args.result).write_text(json.dumps(result))


def spawn(args: argparse.Namespace, role: str, policy: str, work: Path) -> dict:
    result = work / f"result-{role}-{policy}.json"
    cmd = [sys.executable, __file__, "--worker", role, "--policy", policy, "--work", str(work), "--result",
           str(result), *args.passthrough]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def steady(seconds: list[float], n: int) -> float:
    return statistics.median(seconds[-n:])


def paired_ratio(ratios: list[float]) -> tuple[float, list[float]]:
    """Geometric mean of per-round ratios with a percentile-bootstrap 95% interval (egolcd.revisits)."""
    import math

    from egolcd.revisits import bootstrap_mean_ci

    logs = [math.log(x) for x in ratios]
    mean, low, high = bootstrap_mean_ci(logs) if len(logs) > 1 else (logs[0], math.nan, math.nan)
    return math.exp(mean), [math.exp(low), math.exp(high)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-forcing", required=True, help="local checkout of guandeh17/Self-Forcing")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--steady", type=int, default=12, help="last chunks that make a run's figure")
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--window", type=int, default=2, help="past chunks in the window (both sides)")
    parser.add_argument("--segments", type=int, default=8, help="egolcd prompt segments over the run")
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="egolcd without its inference fast path")
    parser.add_argument("--with-plain", action="store_true",
                        help="also run egolcd's plain path (fast_path=False) for sink-window and egolcd")
    parser.add_argument("--out", help="write the measurements as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (Path(args.self_forcing) / "pipeline" / "causal_inference.py").is_file():
        parser.error(f"{args.self_forcing} is not a Self-Forcing checkout (no pipeline/causal_inference.py)")
    skip = {"--out", "--rounds", "--with-plain"}
    args.passthrough, it = [], iter(sys.argv[1:])
    for token in it:  # the options every worker needs (all but the driver's own)
        name = token.split("=")[0]
        if name in skip:
            if "=" not in token and name != "--with-plain":
                next(it, None)
            continue
        args.passthrough.append(token)

    with tempfile.TemporaryDirectory(prefix="egolcd-peer-") as tmp:
        work = Path(tmp)
        check = spawn(args, "setup", "window", work)
        print(f"same function: first forward max |peer - egolcd| = {check['first_forward_max_abs_diff']:.2e} "
              f"(output mean |v| {check['output_abs_mean']:.3f})", flush=True)
        runs: dict[str, list[float]] = {}
        turns: list[float] = []  # per round: egolcd / sink-window, the two taking turns chunk by chunk
        order = [("peer", p) for p in PEER_POLICIES] + [("egolcd", p) for p in POLICIES]
        order += [("egolcd-turns", "egolcd")]
        if args.with_plain:
            order += [("egolcd-plain", "sink-window"), ("egolcd-plain", "egolcd")]
        for r in range(args.rounds):
            for role, policy in order if r % 2 == 0 else order[::-1]:  # alternate, and reverse every round
                res = spawn(args, role, policy, work)
                if role == "egolcd-turns":
                    a, b = (steady(res["chunk_seconds"][p], args.steady) for p in ("egolcd", "sink-window"))
                    turns.append(a / b)
                    print(f"round {r} egolcd / sink-window in turns chunk by chunk: {a / b:.3f} "
                          f"({a * 1e3:.2f} / {b * 1e3:.2f} ms/chunk)", flush=True)
                    continue
                value = steady(res["chunk_seconds"], args.steady)
                runs.setdefault(f"{role}:{policy}", []).append(value)
                print(f"round {r} {role:<7} {policy:<12} {value * 1e3:7.2f} ms/chunk", flush=True)

    med = {name: statistics.median(v) for name, v in runs.items()}
    rows = [
        ("window (W past chunks)", med["peer:window"], med["egolcd:window"]),
        ("sink + window", med["peer:sink-window"], med["egolcd:sink-window"]),
        ("egolcd memory vs the peer's sink + window", med["peer:sink-window"], med["egolcd:egolcd"]),
    ]
    table = ["| policy | Self-Forcing ms/chunk | egolcd ms/chunk | egolcd / peer |", "|---|---|---|---|"]
    table += [f"| {n} | {p * 1e3:.1f} | {e * 1e3:.1f} | {e / p:.3f} |" for n, p, e in rows]
    policy_ratio = med["egolcd:egolcd"] / med["egolcd:sink-window"]
    table.append(f"\negolcd policy / egolcd sink-window, separate runs: {policy_ratio:.3f} (target <= 1.08)")
    turns_ratio, turns_ci = paired_ratio(turns)
    table.append(f"egolcd policy / egolcd sink-window, in turns chunk by chunk: {turns_ratio:.3f} "
                 f"[{turns_ci[0]:.3f}, {turns_ci[1]:.3f}] over {len(turns)} rounds (target <= 1.08)")
    plain_ratios = {}
    for policy in ("sink-window", "egolcd"):
        if f"egolcd-plain:{policy}" in med:
            plain_ratios[policy] = med[f"egolcd:{policy}"] / med[f"egolcd-plain:{policy}"]
            table.append(f"egolcd {policy}: fast path / plain path {plain_ratios[policy]:.3f} "
                         f"({med[f'egolcd-plain:{policy}'] * 1e3:.1f} ms plain)")
    if "egolcd-plain:egolcd" in med:
        table.append(f"plain path: egolcd policy / sink-window "
                     f"{med['egolcd-plain:egolcd'] / med['egolcd-plain:sink-window']:.3f}")
    print("\n".join(table))
    if args.out:
        report = {
            "config": {k: v for k, v in vars(args).items() if k not in ("passthrough", "worker", "policy", "work",
                                                                       "result")},
            "torch": torch.__version__, "threads": 1, "dtype": "float32",
            "check": check, "runs_ms": {k: [x * 1e3 for x in v] for k, v in runs.items()},
            "median_ms": {k: v * 1e3 for k, v in med.items()},
            "ratios": {"window": rows[0][2] / rows[0][1], "sink-window": rows[1][2] / rows[1][1],
                       "egolcd_vs_peer_sink_window": rows[2][2] / rows[2][1], "egolcd_vs_sink_window": policy_ratio,
                       "egolcd_vs_sink_window_turns": {"ratio": turns_ratio, "ci95": turns_ci, "rounds": turns},
                       "fast_over_plain": plain_ratios},
            "peer_shims": ["torch.cuda.current_device -> 0", "flash_attention/attention -> float32 SDPA",
                           "stub text encoder and VAE", "kv/cross-attn caches sized for the tiny model"],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
