"""The ``egolcd`` command.

    egolcd validate NARRATIVE.yaml
    egolcd generate NARRATIVE.yaml -o out.mp4 [--model DIR] [--memory egolcd|dense|window|sink-window|none]
                    [--steps N] [--guidance G] [--memory-guidance G] [--seed S] [--save-state P] [--resume P]
                    [--from-video CLIP | --from-image PHOTO] [--no-footage-in-output]
    egolcd create-model DIR --preset tiny        # random weights, diffusers layout (tests, training start)
    egolcd create-model DIR --from-wan WAN_DIFFUSERS_DIR [--transformer CONVERTED]   # released weights, linked
    egolcd convert SRC DST [--from auto|wan|self-forcing|causvid|longlive] [--ema] [--lora LORA.pt]
    egolcd studio [--model DIR] [--port 7860]    # local web studio (Gradio, localhost)
    egolcd bench --preset tiny [--device cuda --dtype bfloat16 --compile]   # speed/memory per policy

Bad input ends with one line on stderr (``egolcd: error: ...``) and exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .cli_checks import check_output, check_size, footage_option, precheck_model
from .config import MEMORY_POLICIES, PRESETS, VAE_TRAIN_CHOICES
from .errors import USER_ERRORS, error_line

logger = logging.getLogger("egolcd")

def _default_model_dir() -> Path:
    from .pipeline import EMBEDDED_MODEL_DIR

    return EMBEDDED_MODEL_DIR


def cmd_validate(args: argparse.Namespace) -> int:
    from .limits import count_frames
    from .narrative import compile_narrative, format_schedule, load_narrative

    preset = PRESETS[args.preset]
    narrative = load_narrative(args.narrative)
    fps = narrative.fps or preset.fps
    count_frames([s.seconds for s in narrative.segments], fps)
    check_size(narrative.width or preset.width, narrative.height or preset.height,
                preset.vae_spatial, int(preset.transformer.get("patch_size", (1, 2, 2))[1]))
    compiled = compile_narrative(
        narrative, fps=narrative.fps or preset.fps, chunk_frames=preset.chunk_frames, vae_temporal=preset.vae_temporal
    )
    sys.stdout.write(format_schedule(compiled) + "\n")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .limits import check_device, check_distinct_paths, check_generation_options, check_state_path
    from .narrative import load_narrative
    from .pipeline import EgoLCDPipeline

    # every check before any weights load or any file is touched
    output = Path(args.output)
    check_output(output)
    check_generation_options(args.steps, args.guidance, args.seed, args.save_state_every, args.memory_guidance)
    check_distinct_paths(args.narrative, output, args.save_state, args.resume)
    if args.save_state is not None:
        check_state_path(args.save_state)
    if args.resume is not None and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume: memory state not found: {args.resume}")
    if args.device is not None:
        check_device(args.device)
    narrative = load_narrative(args.narrative)  # fail on a bad narrative before loading any weights
    footage = footage_option(args, narrative, output)
    model_dir = Path(args.model) if args.model else _default_model_dir()
    if args.model is None and not (model_dir / "egolcd_config.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing from {model_dir} (an incomplete install?); "
            "pass --model DIR (e.g. one made by `egolcd create-model DIR --preset tiny`)"
        )
    precheck_model(model_dir, narrative, footage)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    pipe = EgoLCDPipeline.from_pretrained(model_dir, device=device, dtype=getattr(torch, dtype_name))
    if args.compile:
        from .pipeline import compile_transformer

        compile_transformer(pipe.transformer)
    memory = None
    if args.memory or args.offload_memory:
        from dataclasses import replace

        memory = replace(
            pipe.config.memory, policy=args.memory or pipe.config.memory.policy,
            offload_long_term="cpu" if args.offload_memory else pipe.config.memory.offload_long_term,
        )
    result = pipe(
        narrative,
        output,
        memory=memory,
        steps=args.steps,
        guidance=args.guidance,
        memory_guidance=args.memory_guidance,
        seed=args.seed,
        sampler=args.sampler,
        save_state=args.save_state,
        save_state_every=args.save_state_every,
        resume=args.resume,
        progress=not args.quiet,
        init_video=footage[0] if footage and footage[1] == "video" else None,
        init_image=footage[0] if footage and footage[1] == "image" else None,
        no_footage_in_output=args.no_footage_in_output,
    )
    logger.info("wrote %s: %d frames at %d fps (%d chunks)", result.path, result.num_frames, result.fps, result.num_chunks)
    sys.stdout.write(f"{result.path}\n")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from .data.sources import prepare_data

    width, height = _parse_size(args.size)
    out = prepare_data(
        args.source, args.out, episodes=args.episodes, seconds=args.seconds, seed=args.seed, width=width,
        height=height, fps=args.fps, progress=not args.quiet, workers=args.workers,
    )
    sys.stdout.write(f"{out}\n")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 64x64 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


def cmd_create_model(args: argparse.Namespace) -> int:
    from .pipeline import EgoLCDPipeline

    if args.position_heads and args.from_wan:
        raise ValueError("--position-heads initialises random weights; it does not apply to --from-wan")
    if args.init_from and args.from_wan:
        raise ValueError("--init-from and --from-wan are exclusive")
    if args.from_wan:
        from .assemble import assemble_model_dir

        out = assemble_model_dir(
            args.directory, args.from_wan, transformer=args.transformer, vae=args.vae,
            text_encoder=args.text_encoder_path, preset=args.preset, chunk_frames=args.chunk_frames,
            link=args.link, overwrite=args.overwrite,
        )
        sys.stdout.write(f"{out}\n")
        return 0
    for option in ("transformer", "chunk_frames"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option.replace('_', '-')} applies to --from-wan only")
    preset = args.preset or "tiny"
    overrides = {"text_encoder_path": args.text_encoder_path} if args.text_encoder_path else {}
    if args.init_from:
        if not args.position_heads:
            raise ValueError("--init-from re-initialises heads of a model: give --position-heads N")
        if Path(args.directory).resolve() == Path(args.init_from).resolve():
            raise ValueError("--init-from and the output directory must differ")
        pipe = EgoLCDPipeline.from_pretrained(args.init_from)
    else:
        pipe = EgoLCDPipeline.from_preset(preset, seed=args.seed, vae_path=args.vae, **overrides)
    if args.position_heads:
        from .training.model import init_position_heads

        init_position_heads(pipe.transformer, args.position_heads)
    pipe.save_pretrained(args.directory)
    if args.init_from:
        logger.info("wrote %s with %d position-matching heads per block to %s", args.init_from, args.position_heads,
                    args.directory)
    else:
        logger.info("wrote a randomly initialised %r model to %s", preset, args.directory)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .convert import convert_checkpoint

    result = convert_checkpoint(
        args.src, args.dst, source_format=args.source_format, ema=args.ema, lora=args.lora,
        lora_alpha=args.lora_alpha, num_heads=args.num_heads, chunk_frames=args.chunk_frames,
        dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.overwrite,
    )
    sys.stdout.write(f"{result.directory}\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train_main

    out = train_main(args.config, resume=args.resume, overrides=args.set or ())
    sys.stdout.write(f"{out}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .limits import check_generation_options
    from .training import export_checkpoint

    check_generation_options(memory_guidance=args.memory_guidance)
    out = export_checkpoint(
        args.checkpoint, args.directory, merge=args.merge, use_ema=not args.no_ema, overwrite=args.overwrite,
        memory_guidance=args.memory_guidance,
    )
    logger.info("exported %s to %s (load with egolcd generate --model %s)", args.checkpoint, out, out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .report import evaluate_main, summary_text

    result = evaluate_main(
        args.videos, args.reference, args.narrative, args.report, args.json, clip_model=args.clip_model,
        fvd_model=args.fvd_model, labels=args.labels.split(",") if args.labels else None,
        feature_model=args.feature_model,
    )
    sys.stdout.write(summary_text(result) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, bench_main, format_table

    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    config = BenchConfig(
        preset=args.preset, chunks=args.chunks, policies=policies, device=args.device, steps=args.steps,
        dtype=args.dtype, height=args.height, width=args.width, threads=args.threads,
        compile=args.compile, offload=args.offload, text_tokens=args.text_tokens,
        importance_stride=args.importance_stride, repeats=args.repeats,
    )
    result = bench_main(config, json_path=args.json, plot_path=args.plot)
    sys.stdout.write(format_table(result) + "\n")
    target = result["flatness_target"]
    if target["ratio"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        sys.stdout.write(f"egolcd flatness {target['ratio']:.3f} (target <= {target['target']}): {verdict}\n")
    ratio = result["policy_ratio"]
    if ratio is not None:
        low, high = ratio["paired_ci95"]
        verdict = "established" if ratio["established"] else "met" if ratio["met"] else "NOT met"
        sys.stdout.write(
            f"egolcd / sink-window {ratio['ratio']:.3f}; paired by pass {ratio['paired_per_pass']:.3f} "
            f"[{low:.3f}, {high:.3f}] over {ratio['passes']} passes (target <= {ratio['target']}): {verdict}\n"
        )
    return 0


def cmd_studio(args: argparse.Namespace) -> int:
    from .studio import StudioConfig, launch_studio

    model = Path(args.model) if args.model else _default_model_dir()
    config = StudioConfig(model=model, host=args.host, port=args.port, device=args.device, outputs=Path(args.outputs))
    launch_studio(config)
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .vae_train import VAETrainConfig, train_vae

    # every train-vae option is named as its VAETrainConfig field; the rest keep their defaults
    config = VAETrainConfig(**{f.name: getattr(args, f.name) for f in fields(VAETrainConfig) if hasattr(args, f.name)})
    train_vae(config, device=args.device or "cpu")
    return 0


def cmd_prepare_latents(args: argparse.Namespace) -> int:
    from .data import EgoVidDataset, build_from_preset, prepare_latents

    overrides = {"chunks_per_clip": args.chunks_per_clip}
    if args.csv:
        overrides["csv"] = args.csv
    if args.video_dir:
        overrides["video_dir"] = args.video_dir
    config = build_from_preset(args.preset, args.data, **overrides)
    dataset = EgoVidDataset(config, progress=not args.quiet)
    if args.model:
        from .pipeline import EgoLCDPipeline

        pipe = EgoLCDPipeline.from_pretrained(args.model)
        vae, text = pipe.vae, pipe.text_encoder
    else:
        from .pipeline import GenerationConfig
        from .text import load_text_encoder
        from .vae import build_vae

        preset = PRESETS[args.preset]
        gen = GenerationConfig.from_preset(preset)
        vae = build_vae(preset, args.vae)
        text = load_text_encoder(gen.text_encoder, args.text_encoder, max_length=gen.text_max_length)
    index = prepare_latents(
        dataset, vae, text, args.out, shard_size=args.shard_size, progress=not args.quiet, preset=args.preset
    )
    logger.info("latent cache %s: %d clips in %d shards", args.out, len(index.clips), len(index.shards))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egolcd", description="Long, coherent egocentric video generation (EgoLCD).")
    parser.add_argument("--version", action="version", version=f"egolcd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a narrative and print its compiled prompts and chunk schedule")
    p.add_argument("narrative", help="narrative file (.yaml, .json or plain text)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="chunk geometry to schedule for")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("generate", help="generate a long video from a narrative")
    p.add_argument("narrative", help="narrative file (.yaml, .json or plain text)")
    p.add_argument("-o", "--output", required=True, help="output .mp4 (written atomically)")
    p.add_argument("--model", help="model directory (default: the embedded demo model)")
    p.add_argument("--memory", choices=MEMORY_POLICIES, help="memory policy (default: the model's, egolcd)")
    p.add_argument("--steps", type=int, help="sampling steps per chunk")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--memory-guidance", type=float,
                   help="guidance on the retrieved memory of a revisit's chunks (default: the model's; 1 = off)")
    p.add_argument("--sampler", choices=["euler", "heun", "unipc", "flow_euler", "distilled"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-state", help="save the memory state here (every --save-state-every chunks)")
    p.add_argument("--save-state-every", type=int, default=8)
    p.add_argument("--resume", help="resume from a saved memory state; the narrative may add segments after the "
                                    "saved run's (extend a finished run: old frames + new ones)")
    p.add_argument("--from-video", metavar="CLIP",
                   help="start from this clip: encoded, written into memory, then the narrative continues it "
                        "(resampled to the model's fps, centre-cropped to its aspect, resized)")
    p.add_argument("--from-image", metavar="PHOTO", help="start from this photo (a one-chunk still clip)")
    p.add_argument("--no-footage-in-output", action="store_true",
                   help="leave the footage's reconstructed frames out of the video")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="transformer and KV-cache precision (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--offload-memory", action="store_true", help="keep the long-term store in CPU memory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare-latents", help="encode an EgoVid-5M-format dataset into a latent cache (resumable)")
    p.add_argument("data", help="dataset root (metadata.csv + videos/)")
    p.add_argument("--out", required=True, help="latent cache directory (re-run to resume)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--model", help="take the VAE and text encoder from this model directory")
    p.add_argument("--vae", help="VAE folder (diffusers layout) when no --model is given")
    p.add_argument("--text-encoder", help="T5/umT5 path for presets that use one")
    p.add_argument("--csv", help="captions CSV (default: DATA/metadata.csv)")
    p.add_argument("--video-dir", help="folder of clips (default: DATA/videos)")
    p.add_argument("--chunks-per-clip", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare_latents)

    p = sub.add_parser("prepare-data", help="render a simulated egocentric dataset (EgoVid-5M layout + narratives)")
    p.add_argument("source", help="memory-maze or tabletop (needs egolcd[sim])")
    p.add_argument("--out", required=True)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="64x64", help="WIDTHxHEIGHT")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="episodes rendered side by side (the same episodes for any N)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("create-model", help="write a model folder: random weights of a preset, or --from-wan released weights")
    p.add_argument("directory")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="sizes (random weights; default tiny) or, with --from-wan, the memory/size defaults "
                        "(default: the Wan preset the transformer matches)")
    p.add_argument("--vae", help="a VAE folder to include (default: the preset's embedded VAE, untrained; "
                                 "with --from-wan: the source's vae/)")
    p.add_argument("--text-encoder", "--text-encoder-path", dest="text_encoder_path",
                   help="umT5/T5 folder or hub id for presets that use one (wan2.1-*)")
    p.add_argument("--from-wan", metavar="SRC",
                   help="assemble from a diffusers Wan2.1 folder (transformer, vae, text_encoder, tokenizer) "
                        "or a transformer folder `egolcd convert` wrote (then give --vae and --text-encoder)")
    p.add_argument("--transformer", help="with --from-wan: a converted transformer folder replacing SRC's")
    p.add_argument("--chunk-frames", type=int, help="with --from-wan: latent frames per chunk (default: the "
                                                    "transformer's, else the preset's)")
    p.add_argument("--link", default="auto", choices=["auto", "hard", "symlink", "copy"],
                   help="with --from-wan: how large files are placed (auto: hard link, else symlink)")
    p.add_argument("--overwrite", action="store_true", help="with --from-wan: replace an existing folder")
    p.add_argument("--position-heads", type=int, default=0, metavar="N",
                   help="start the first N self-attention heads of every block as position-matching heads "
                        "(random weights, or those of --init-from; docs/METHOD.md)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="a model folder to copy, re-initialising its first --position-heads heads (the demo recipe's "
                        "stage 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_create_model)

    p = sub.add_parser("convert", help="original-layout Wan2.1 / Self-Forcing / CausVid / LongLive DiT -> diffusers folder")
    p.add_argument("src", help=".safetensors (file, shard folder or index) or .pt (read with weights_only=True)")
    p.add_argument("dst", help="output transformer folder (config.json + safetensors [+ lora/])")
    p.add_argument("--from", dest="source_format", default="auto",
                   choices=["auto", "wan", "self-forcing", "causvid", "longlive"])
    p.add_argument("--ema", action="store_true", help="convert generator_ema instead of generator")
    p.add_argument("--lora", help="a LoRA checkpoint on the original module names (LongLive's lora.pt)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: its rank, as LongLive)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: config.json's, else dim / 128)")
    p.add_argument("--chunk-frames", type=int, default=3, help="latent frames per block-causal chunk")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast (default: keep)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train/fine-tune with accelerate (`accelerate launch -m egolcd train` for many GPUs)")
    p.add_argument("config", help="training config YAML (see configs/train/)")
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config setting (dotted keys for nested ones, values as YAML), e.g. "
                   "--set grad_accum=2 --set optimizer.lr=5e-4; repeatable")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a model directory from a training checkpoint")
    p.add_argument("checkpoint", help="a checkpoint-N directory or a run directory (its latest checkpoint)")
    p.add_argument("directory", help="output model directory")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--memory-guidance", type=float,
                   help="the model's default memory guidance for revisit chunks (default: the init model's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="drift, NRDP, revisit consistency, flicker (+FVD/CLIP with local weights)")
    p.add_argument("videos", nargs="+", help="generated videos (.mp4)")
    p.add_argument("--reference", help="real reference video of the same narrative")
    p.add_argument("--narrative", help="the narrative (segments and revisits)")
    p.add_argument("--report", help="write an HTML report here")
    p.add_argument("--json", help="write the metrics as JSON here")
    p.add_argument("--labels", help="comma-separated labels (default: file names)")
    p.add_argument("--clip-model", help="local CLIP folder for CLIP score")
    p.add_argument("--fvd-model", help="local VideoMAE folder for FVD")
    p.add_argument("--feature-model", help="local DINO/CLIP folder for the consistency features")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="speed and memory per chunk for each memory policy (random weights)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--policies", default=",".join(MEMORY_POLICIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--offload", action="store_true", help="keep the long-term store in CPU memory")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole sequence this many times (the policies take turns chunk by chunk) and keep each chunk's "
                        "fastest time (robust to load bursts)")
    p.add_argument("--text-tokens", type=int, default=32, help="prompt tokens (Wan2.1's umT5: 512)")
    p.add_argument("--importance-stride", type=int, default=1,
                   help="estimate importance from every s-th query (1 = exact)")
    p.add_argument("--json", help="write the per-chunk results as JSON")
    p.add_argument("--plot", help="write a PNG plot of cost vs chunk index")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("studio", help="local web studio: write a narrative, watch the video stream in, inspect memory")
    p.add_argument("--model", help="model directory (default: the embedded demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.add_argument("--outputs", default="outputs/studio", help="folder for the generated videos")
    p.set_defaults(func=cmd_studio)

    p = sub.add_parser("train-vae", help="train the embedded video VAE on an EgoVid-format dataset "
                       "(`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m egolcd train-vae` for two processes)")
    p.add_argument("data", help="dataset root (metadata.csv + videos/)")
    p.add_argument("--out", required=True, help="output VAE folder (diffusers layout)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--crop-frames", type=int, default=13, help="frames per training crop, 4k + 1 (default: 13)")
    p.add_argument("--chunks-per-clip", type=int, default=4, help="frames loaded per video, in DiT chunks")
    p.add_argument("--crop-size", type=int, help="train on random square crops of this many pixels")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--init", help="a trained VAE folder to continue from")
    p.add_argument("--decoder-only", action="store_true",
                   help="train only the decoder (keeps the encoder, its latents and their statistics)")
    p.add_argument("--latent-channels", type=int,
                   help="a new VAE with this many latent channels (default: the preset's)")
    p.add_argument("--base-dim", type=int, help="a new VAE with this base width (default: the preset's)")
    p.add_argument("--loss", choices=VAE_TRAIN_CHOICES["loss"], default="mse", help="reconstruction error (default: mse)")
    p.add_argument("--posterior", choices=VAE_TRAIN_CHOICES["posterior"], default="mode",
                   help="decode a posterior sample or its mean, the DiT's latents (default: mode)")
    p.add_argument("--lr-schedule", choices=VAE_TRAIN_CHOICES["lr_schedule"], default="cosine",
                   help="after a 100-step warm-up: constant, or cosine down to 10%% of --lr (default: cosine)")
    p.add_argument("--precision", choices=VAE_TRAIN_CHOICES["precision"], default="fp32",
                   help="bf16: encoder and decoder under bf16 autocast, faster on CPUs with AVX-512 BF16 "
                   "(default: fp32)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between resumable checkpoints in OUT/checkpoint/ (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/ when there is one")
    p.add_argument("--max-clips", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.set_defaults(func=cmd_train_vae)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("diffusers", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("egolcd: interrupted\n")
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        sys.stderr.write(error_line(exc) + "\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
