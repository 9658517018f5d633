"""The latent cache's ``index.json`` (:class:`LatentIndex`: geometry, clips, shards), its atomic writes, and the
identities of the VAE and text encoder that made a cache (a resumed run must use the same ones)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..text import TextEncoder
    from ..vae import VideoVAE

LATENT_FORMAT = "egolcd-latents"
LATENT_FORMAT_VERSION = 1
INDEX_NAME = "index.json"


# ------------------------------------------------------------------------------------------ index
@dataclass
class LatentGeometry:
    """What every clip of a cache looks like.

    Args:
        chunk_frames: latent frames per chunk.
        chunks_per_clip: N, chunks (and prompts) per clip.
        num_latent_frames: L = N * chunk_frames.
        latent_channels: C.
        latent_height, latent_width: h, w.
        num_frames, height, width, fps, vae_temporal: the pixel clip the latents encode.
        text_dim: D of the token states; text_len: Lt, their padded length; pooled_dim: E.
    """

    chunk_frames: int
    chunks_per_clip: int
    num_latent_frames: int
    latent_channels: int
    latent_height: int
    latent_width: int
    num_frames: int
    height: int
    width: int
    fps: int
    vae_temporal: int
    text_dim: int
    text_len: int
    pooled_dim: int


@dataclass
class LatentClip:
    """One cached clip.

    Args:
        video_id: the dataset id.
        shard: shard file name.
        key: tensor-name prefix inside the shard.
        num_latent_frames: L of its latents.
    """

    video_id: str
    shard: str
    key: str
    num_latent_frames: int


@dataclass
class LatentIndex:
    """The contents of ``index.json``.

    Args:
        geometry: clip geometry.
        vae: identity of the VAE (class, config and weight hashes, source path).
        text_encoder: identity of the text encoder (class, model, max_length).
        clips: cached clips in dataset order.
        shards: shard file names.
        skipped: clips left out, by reason (the dataset's scan plus clips that failed to decode).
        failed: video_id -> reason for clips that failed to decode (not retried on resume).
        complete: the run finished (no clip of the dataset left to encode).
        preset: the preset name, when known.
        format, version: ``"egolcd-latents"``, ``1``.
    """

    geometry: LatentGeometry
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    clips: list[LatentClip] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    preset: str | None = None
    format: str = LATENT_FORMAT
    version: int = LATENT_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (format and version first)."""
        data = asdict(self)
        return {"format": data.pop("format"), "version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentIndex:
        """Parse an ``index.json`` object (raises ``KeyError``/``TypeError`` on a malformed one)."""
        if data.get("format") != LATENT_FORMAT:
            raise ValueError(f"not an egolcd latent index (format {data.get('format')!r})")
        if int(data.get("version", -1)) != LATENT_FORMAT_VERSION:
            raise ValueError(
                f"latent index version {data.get('version')!r}, this egolcd reads {LATENT_FORMAT_VERSION}"
            )
        body = dict(data)
        body["geometry"] = LatentGeometry(**data["geometry"])
        body["clips"] = [LatentClip(**c) for c in data["clips"]]
        return cls(**body)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``directory/index.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=1 if len(self.clips) < 10_000 else None)
        _atomic_write(Path(directory) / INDEX_NAME, lambda tmp: tmp.write_text(text + "\n"))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LatentIndex:
        """Read ``directory/index.json``.

        Raises:
            FileNotFoundError: no index (one line).
            ValueError: unreadable, malformed or of another format version (one line).
        """
        path = Path(directory).expanduser() / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no latent index {path} (run `egolcd prepare-latents` first)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"corrupt latent index {path}: {first}") from None


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through ``write(tmp)`` to a hidden temporary file beside ``path``, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ identity
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def vae_identity(vae: VideoVAE) -> dict[str, Any]:
    """What makes two VAEs encode alike: class, config hash and a hash of the weights.

    Args:
        vae: the VAE.
    """
    config = {k: v for k, v in dict(vae.model.config).items() if not k.startswith("_")}
    h = hashlib.sha256()
    for name, tensor in sorted(vae.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return dict(
        cls=type(vae.model).__name__,
        config=_sha(json.dumps(config, sort_keys=True, default=str).encode()),
        weights=h.hexdigest()[:16],
        path=str(getattr(vae.model.config, "_name_or_path", "") or ""),
    )


def text_encoder_identity(encoder: TextEncoder) -> dict[str, Any]:
    """Class, model location and token geometry of a text encoder.

    Args:
        encoder: the text encoder.
    """
    source = getattr(encoder, "path_or_id", None) or getattr(encoder, "model_dir", None) or ""
    return dict(
        cls=type(encoder).__name__,
        model=str(source),
        max_length=int(encoder.max_length),
        dim=int(encoder.dim),
        pooled_dim=int(encoder.pooled_dim),
        dtype=str(getattr(getattr(encoder, "model", None), "dtype", "")),
    )
