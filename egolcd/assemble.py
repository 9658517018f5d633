"""Assemble an egolcd model folder from released Wan2.1 parts (``egolcd create-model DIR --from-wan SRC``).

``SRC`` is either

* a diffusers Wan2.1 pipeline folder (``Wan2.1-T2V-1.3B-Diffusers``: ``transformer/``, ``vae/``,
  ``text_encoder/`` (umT5), ``tokenizer/``), or
* a transformer folder that ``egolcd convert`` wrote (``config.json`` + safetensors [+ ``lora/``]
  [+ ``egolcd_distillation.json``]); the VAE and the text encoder then come from ``vae=`` and
  ``text_encoder=`` (e.g. the Wan pipeline folder's).

``transformer=`` replaces the pipeline folder's DiT by a converted one (Self-Forcing, CausVid, LongLive
use Wan2.1's own VAE and umT5). The result is what ``EgoLCDPipeline.from_pretrained`` reads:
``transformer/`` (its ``config.json`` rewritten with ``chunk_frames``), ``vae/``, ``text_encoder/`` +
``tokenizer/``, ``scheduler/``, ``model_index.json`` and ``egolcd_config.json`` with the preset's memory
defaults and fps/size, and the sampling defaults of the source: a distilled DiT's own sampler, step list
and shift (from its ``egolcd_distillation.json``), else Wan2.1's (UniPC, 50 steps, guidance 5, shift 5).

Large files (``*.safetensors``, ``*.bin``, ``*.model``) are hard links to the source where the filesystem
allows (same filesystem), else symbolic links, unless ``link="copy"``. Linked files share their bytes with
the source: do not write into them in place. Configs are always written or copied.

Nothing is loaded: the parts are checked against each other from their configs (latent channels, text
width, VAE factors), and every problem is one ``ValueError``/``FileNotFoundError`` line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import PRESETS, Preset, get_preset

logger = logging.getLogger(__name__)

LINK_MODES = ("auto", "hard", "symlink", "copy")
_LARGE_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth")
#: Wan2.1's own sampling (its generate.py defaults for text-to-video): used for non-distilled DiTs.
WAN_SAMPLING: dict[str, Any] = {"sampler": "unipc", "steps": 50, "guidance": 5.0, "shift": 5.0}
#: Transformer config fields a Wan preset is recognised by.
_PRESET_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "text_dim")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _transformer_folder(path: Path) -> Path:
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"no transformer in {path} (neither transformer/config.json nor config.json)")


def _vae_folder(path: Path) -> Path:
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"no VAE in {path} (neither vae/config.json nor config.json)")


def _text_encoder_parts(path: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a local umT5: a pipeline root (``text_encoder/`` +
    ``tokenizer/``) or one folder holding both."""
    if (path / "text_encoder" / "config.json").is_file():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return path / "text_encoder", tok
    if (path / "config.json").is_file():
        return path, path
    raise FileNotFoundError(f"no text encoder in {path} (neither text_encoder/config.json nor config.json)")


def match_preset(transformer_config: dict[str, Any]) -> str | None:
    """The Wan preset whose sizes the transformer config has, or None."""
    for name, preset in PRESETS.items():
        if preset.vae != "wan":
            continue
        if all(transformer_config.get(f) == preset.transformer.get(f) for f in _PRESET_FIELDS):
            return name
    return None


def _place_file(src: Path, dst: Path, link: str) -> str:
    """Put ``src`` at ``dst``: large files linked (``link``), small ones copied. Returns how."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link != "copy" and src.suffix in _LARGE_SUFFIXES:
        if link in ("auto", "hard"):
            try:
                os.link(src, dst)
                return "hard"
            except OSError:
                if link == "hard":
                    raise
        try:
            os.symlink(src.resolve(), dst)
            return "symlink"
        except OSError:
            if link == "symlink":
                raise
    shutil.copy2(src, dst)
    return "copy"


def _place_tree(src: Path, dst: Path, link: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or rel.parts[0] in skip or rel.parts[0].startswith("."):
            continue
        how = _place_file(path, dst / rel, link)
        counts[how] = counts.get(how, 0) + 1
    return counts


def assemble_model_dir(
    directory: str | Path,
    source: str | Path,
    *,
    transformer: str | Path | None = None,
    vae: str | Path | None = None,
    text_encoder: str | None = None,
    preset: str | None = None,
    chunk_frames: int | None = None,
    link: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write an egolcd model folder at ``directory`` from Wan2.1 parts (module docstring).

    Args:
        source: a diffusers Wan2.1 pipeline folder, or a transformer folder ``egolcd convert`` wrote.
        transformer: a (converted) transformer folder replacing ``source``'s.
        vae: a VAE folder or pipeline root (default: ``source``'s ``vae/``).
        text_encoder: a local umT5 folder or pipeline root, linked in; any other string (a hub id) is
            stored as ``text_encoder_path`` (default: ``source``'s ``text_encoder/`` + ``tokenizer/``).
        preset: preset of the memory, size and fps defaults (default: the Wan preset whose sizes the
            transformer has; one must match when not given).
        chunk_frames: latent frames per chunk (default: the transformer config's, else the preset's).
        link: ``auto`` (hard link, else symlink), ``hard``, ``symlink`` or ``copy`` for the large files.
        overwrite: replace an existing non-empty ``directory``.
    """
    from .convert import DISTILLATION_NAME
    from .pipeline import CONFIG_NAME, GenerationConfig
    from .text import TEXT_ENCODERS

    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    directory, source = Path(directory), Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"--from-wan: folder not found: {source}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass --overwrite to replace it)")
    out_abs, parts = directory.resolve(), [Path(p).resolve() for p in (source, transformer, vae, text_encoder) if p]
    for part in parts:  # the output replaces the folder it writes: never one holding (or inside) a source
        if out_abs == part or out_abs in part.parents or part in out_abs.parents:
            raise ValueError(f"the model folder {directory} must not hold, or be inside, the source {part}")
    pipeline_root = (source / "transformer" / "config.json").is_file()

    # 1. the parts
    tdir = _transformer_folder(Path(transformer) if transformer is not None else source)
    if not _has_weights(tdir):
        raise FileNotFoundError(f"no *.safetensors weights in transformer folder {tdir}")
    if vae is None and not pipeline_root:
        raise ValueError(f"{source} is a transformer folder: give the VAE (--vae, e.g. the Wan2.1 diffusers folder)")
    vdir = _vae_folder(Path(vae) if vae is not None else source)
    if not _has_weights(vdir):
        raise FileNotFoundError(f"no *.safetensors weights in VAE folder {vdir}")
    text_parts: tuple[Path, Path] | None = None
    text_path: str | None = None
    if text_encoder is None:
        if not pipeline_root:
            raise ValueError(f"{source} is a transformer folder: give the umT5 text encoder (--text-encoder)")
        text_parts = _text_encoder_parts(source)
    elif Path(text_encoder).exists():
        text_parts = _text_encoder_parts(Path(text_encoder))
    else:  # a hub id: stored, loaded (from the local cache) at generation time
        text_path = text_encoder

    # 2. configs, checked against each other
    tcfg = _read_json(tdir / "config.json")
    vcfg = _read_json(vdir / "config.json")
    name = preset or match_preset(tcfg)
    if name is None:
        sizes = ", ".join(f"{f}={tcfg.get(f)}" for f in _PRESET_FIELDS)
        raise ValueError(f"the transformer ({sizes}) matches no Wan preset; pass --preset for its defaults")
    chosen: Preset = get_preset(name)
    if chosen.text_encoder not in TEXT_ENCODERS or chosen.text_encoder == "minilm":
        raise ValueError(f"--from-wan needs a preset with a umT5/T5 text encoder (wan2.1-*), got {name!r}")
    mismatch = [f for f in _PRESET_FIELDS if tcfg.get(f) != chosen.transformer.get(f)]
    if preset is not None and mismatch:
        logger.warning("the transformer's sizes differ from preset %r (%s): only its defaults are used",
                       name, ", ".join(mismatch))
    k = int(chunk_frames or tcfg.get("chunk_frames") or chosen.chunk_frames)
    if k < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {k}")
    if tcfg.get("in_channels") != vcfg.get("z_dim"):
        raise ValueError(
            f"model mismatch: the transformer expects {tcfg.get('in_channels')} latent channels, "
            f"the VAE ({vdir}) has {vcfg.get('z_dim')}"
        )
    factors = (int(vcfg.get("scale_factor_temporal") or 4), int(vcfg.get("scale_factor_spatial") or 8))
    if factors != (chosen.vae_temporal, chosen.vae_spatial):
        raise ValueError(
            f"the VAE compresses {factors[0]}x/{factors[1]}x (time/space), preset {name!r} expects "
            f"{chosen.vae_temporal}x/{chosen.vae_spatial}x"
        )
    if text_parts is not None:
        ecfg = _read_json(text_parts[0] / "config.json")
        if ecfg.get("model_type") not in ("t5", "umt5"):
            raise ValueError(f"{text_parts[0]} holds a {ecfg.get('model_type')!r} model, not a T5/umT5 encoder")
        if ecfg.get("d_model") != tcfg.get("text_dim"):
            raise ValueError(
                f"model mismatch: the transformer expects {tcfg.get('text_dim')}-d text states, "
                f"the text encoder ({text_parts[0]}) gives {ecfg.get('d_model')}-d"
            )
    distillation = None
    if (tdir / DISTILLATION_NAME).is_file():
        distillation = _read_json(tdir / DISTILLATION_NAME)

    # 3. sampling defaults: the distilled model's own, else Wan2.1's
    if distillation is not None:
        steps_list = distillation.get("denoising_step_list")
        if not isinstance(steps_list, list) or not steps_list:
            raise ValueError(f"{tdir / DISTILLATION_NAME} has no denoising_step_list")
        sampling: dict[str, Any] = dict(
            sampler=str(distillation.get("sampler", "distilled")), steps=len(steps_list), guidance=1.0,
            shift=float(distillation.get("shift", 5.0)), denoising_step_list=[int(s) for s in steps_list],
            warp_denoising_step=bool(distillation.get("warp_denoising_step", True)),
        )
    else:
        sampling = dict(WAN_SAMPLING)
    config = GenerationConfig.from_preset(
        chosen, text_encoder=chosen.text_encoder, text_encoder_path=text_path, **sampling
    )

    # 4. write (into a temporary sibling, renamed at the end: no half-made model folder)
    tmp = directory.with_name(directory.name + ".assembling")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts: dict[str, int] = {}

        def add(c: dict[str, int]) -> None:
            for key, value in c.items():
                counts[key] = counts.get(key, 0) + value

        add(_place_tree(tdir, tmp / "transformer", link, skip=("config.json",)))
        tcfg_out = {**tcfg, "_class_name": "EgoLCDTransformer3DModel", "chunk_frames": k}
        (tmp / "transformer" / "config.json").write_text(json.dumps(tcfg_out, indent=2, sort_keys=True))
        add(_place_tree(vdir, tmp / "vae", link))
        if text_parts is not None:
            model_dir, tok_dir = text_parts
            add(_place_tree(model_dir, tmp / "text_encoder", link))
            if tok_dir != model_dir:
                add(_place_tree(tok_dir, tmp / "tokenizer", link))
        from .flow import make_scheduler

        make_scheduler("unipc", config.steps, config.shift).save_pretrained(str(tmp / "scheduler"))
        index = {
            "_class_name": "EgoLCDPipeline",
            "transformer": ["egolcd", "EgoLCDTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["egolcd", config.text_encoder],
            "_assembled_from": {"source": str(source), "transformer": str(tdir), "vae": str(vdir)},
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    how = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
    logger.info(
        "assembled %s from %s (preset %s, chunk_frames %d, sampler %s, %d steps; files: %s)",
        directory, source, name, k, config.sampler, config.steps, how,
    )
    return directory


__all__ = ["LINK_MODES", "WAN_SAMPLING", "assemble_model_dir", "match_preset"]
