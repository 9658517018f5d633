"""One VAE interface for every preset: diffusers ``AutoencoderKLWan``.

The real Wan2.1 VAE (``preset.vae == "wan"``, loaded from a local folder) and the embedded small VAE
(``preset.vae == "embedded"``, a small ``AutoencoderKLWan`` config) run the same code.

Conventions:
    pixels: ``(B, 3, T, H, W)`` float in [-1, 1], ``T = 4k + 1``.
    latents: ``(B, C, L, H / 8, W / 8)`` with ``L = 1 + (T - 1) / 4``, *normalised* exactly as diffusers'
    ``WanPipeline`` does: ``(z - latents_mean) / latents_std``. Every latent that leaves this module is
    normalised; every latent that enters it is de-normalised before the decoder.

Streaming: ``StreamingDecoder`` / ``StreamingEncoder`` keep the causal-convolution feature cache of
``AutoencoderKLWan`` between calls, so a long video is decoded (encoded) chunk by chunk with constant
memory and the same result as one call.

    >>> from egolcd.config import PRESETS
    >>> vae = build_vae(PRESETS["tiny"], None)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .config import Preset

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_VAE_CONFIGS",
    "StreamingDecoder",
    "StreamingEncoder",
    "VideoVAE",
    "build_vae",
    "embedded_vae_config",
]


def _embedded(
    base_dim: int, z_dim: int, num_res_blocks: int, spatial: int = 8, temporal: int = 4
) -> dict[str, Any]:
    # Wan's architecture, only thinner: 3 down stages with temporal down in the last two (8x spatial,
    # 4x temporal), or 2 down stages, both temporal (4x spatial, 4x temporal: less spatial compression
    # for small frames), or 2 down stages, the first temporal (4x spatial, 2x temporal: groups of 2 frames,
    # which the demo-t2 DiT patches 2 to a token frame); identity latent normalisation until a trained
    # checkpoint provides statistics.
    stages = {
        (8, 4): ([1, 2, 4, 4], [False, True, True]),
        (4, 4): ([1, 2, 4], [True, True]),
        (4, 2): ([1, 2, 4], [True, False]),
    }
    dim_mult, temporal_down = stages[spatial, temporal]
    return dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=num_res_blocks,
        attn_scales=[],
        temperal_downsample=temporal_down,
        dropout=0.0,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_temporal=temporal,
        scale_factor_spatial=spatial,
    )


#: Small ``AutoencoderKLWan`` configs keyed by preset name; ``z_dim`` equals the preset's latent channels.
#: tiny: 0.64 M parameters (tests; 9x64x64 encodes + decodes in ~0.3 s on CPU).
#: demo: 1.8 M parameters, 4x spatial (64x64 frames -> 16x16x8 latents; the embedded default, trainable
#: on CPU; the 8x version reconstructed held-out footage at only 17-20 dB PSNR).
EMBEDDED_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": _embedded(base_dim=8, z_dim=4, num_res_blocks=1),
    "demo": _embedded(base_dim=16, z_dim=8, num_res_blocks=1, spatial=4),
    "demo-t2": _embedded(base_dim=16, z_dim=8, num_res_blocks=1, spatial=4, temporal=2),
}


def embedded_vae_config(preset: Preset, latent_channels: int | None = None) -> dict[str, Any]:
    """The embedded VAE config for ``preset`` (a copy), checked against the preset's latent geometry.

    Presets without their own entry use the ``demo`` config with ``z_dim`` set to ``preset.latent_channels``
    (or ``latent_channels``: a VAE of another width, ``train-vae --latent-channels``).
    """
    cfg = json.loads(json.dumps(EMBEDDED_VAE_CONFIGS.get(preset.name, EMBEDDED_VAE_CONFIGS["demo"])))
    z = preset.latent_channels if latent_channels is None else latent_channels
    if cfg["z_dim"] != z:
        cfg.update(z_dim=z, latents_mean=[0.0] * z, latents_std=[1.0] * z)
    if (preset.vae_temporal, preset.vae_spatial) != (cfg["scale_factor_temporal"], cfg["scale_factor_spatial"]):
        raise ValueError(
            f"preset {preset.name!r}: the embedded VAE compresses {cfg['scale_factor_temporal']}x in time and "
            f"{cfg['scale_factor_spatial']}x in space, "
            f"got vae_temporal={preset.vae_temporal}, vae_spatial={preset.vae_spatial}"
        )
    return cfg


def _place(model: AutoencoderKLWan, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    # Cast only when needed: diffusers warns on every ``.to(dtype)`` of a ModelMixin.
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device=device)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _resolve_folder(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """Find the VAE folder: ``path`` itself or a pipeline root's ``vae/`` subfolder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"VAE path not found: {root}")
    if not root.is_dir():
        raise ValueError(f"VAE path must be a folder in diffusers layout (config.json + safetensors): {root}")
    if (root / "config.json").is_file():
        return root, None
    if (root / "vae" / "config.json").is_file():
        return root, "vae"
    raise FileNotFoundError(f"no config.json in VAE folder {root} (expected diffusers layout)")


class VideoVAE:
    """A frozen ``AutoencoderKLWan`` with egolcd's pixel/latent conventions (module docstring).

    All methods run without gradients: the VAE is frozen in EgoLCD.

    Args:
        model: the diffusers autoencoder; it is put in eval mode with gradients off.
    """

    def __init__(self, model: AutoencoderKLWan) -> None:
        if not isinstance(model, AutoencoderKLWan):
            raise TypeError(f"VideoVAE wraps diffusers AutoencoderKLWan, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> VideoVAE:
        """Load a local folder in diffusers layout (``config.json`` + ``*.safetensors``).

        A Wan pipeline root whose VAE lives in ``vae/`` is accepted too. Never loads pickles.

        Args:
            path: the folder.
            dtype: parameter dtype (the Wan VAE is usually run in float32 or bfloat16).
            device: target device.

        Raises:
            FileNotFoundError: the folder or its config is missing.
            ValueError: the folder holds no loadable ``AutoencoderKLWan`` (bad config or weights).
        """
        root, subfolder = _resolve_folder(path)
        folder = root / subfolder if subfolder else root
        try:
            class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable VAE config {folder / 'config.json'}: {_one_line(exc)}") from None
        if class_name not in (None, "AutoencoderKLWan"):
            raise ValueError(f"{folder} holds a {class_name}, expected AutoencoderKLWan")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors weights in VAE folder {folder}")
        try:
            model = AutoencoderKLWan.from_pretrained(
                str(root), subfolder=subfolder, torch_dtype=dtype, use_safetensors=True, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load AutoencoderKLWan from {folder}: {_one_line(exc)}") from None
        logger.debug("loaded VAE from %s (z_dim=%d)", folder, model.config.z_dim)  # not a stderr line per run
        return cls(_place(model, dtype, device))

    @classmethod
    def from_config_dict(
        cls,
        config: dict[str, Any],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> VideoVAE:
        """Randomly initialised VAE from ``AutoencoderKLWan`` keyword arguments.

        Args:
            config: ``AutoencoderKLWan.__init__`` keyword arguments (e.g. an ``EMBEDDED_VAE_CONFIGS`` entry).
            dtype, device: parameter dtype and device.
            seed: when given, the initialisation is deterministic and leaves the global RNG untouched.
        """
        if seed is None:
            model = AutoencoderKLWan(**config)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoencoderKLWan(**config)
        return cls(_place(model, dtype, device))

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` to ``directory``."""
        self.model.save_pretrained(str(directory), safe_serialization=True)

    # ------------------------------------------------------------------ geometry
    @property
    def latent_channels(self) -> int:
        return int(self.model.config.z_dim)

    @property
    def temporal_factor(self) -> int:
        return int(self.model.config.get("scale_factor_temporal") or 4)

    @property
    def spatial_factor(self) -> int:
        return int(self.model.config.get("scale_factor_spatial") or 8)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> VideoVAE:
        """Move (and optionally cast) the wrapped model in place; returns ``self``."""
        _place(self.model, dtype or self.dtype, device or self.device)
        return self

    def num_latent_frames(self, num_frames: int) -> int:
        """``1 + (T - 1) / 4``; raises a one-line ``ValueError`` unless ``T = 4k + 1``."""
        f = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % f:
            raise ValueError(
                f"the VAE needs {f}k+1 pixel frames (1, {1 + f}, {1 + 2 * f}, ...), got {num_frames}"
            )
        return 1 + (num_frames - 1) // f

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """``1 + 4 (L - 1)`` pixel frames for ``L`` latent frames."""
        return 1 + self.temporal_factor * (num_latent_frames - 1)

    # ------------------------------------------------------------------ normalisation
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> model latents: ``(z - mean) / std`` (as diffusers' Wan pipelines)."""
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw latents: ``latents * std + mean`` (as ``WanPipeline`` before ``vae.decode``)."""
        mean, inv_std = self._stats(latents)
        return latents / inv_std + mean

    # ------------------------------------------------------------------ checks
    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.model.config
        channels = cfg.in_channels // (cfg.patch_size**2 if cfg.patch_size else 1)  # Wan2.2 VAE patchifies
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(f"expected a pixel video (B, 3, T, H, W), got shape {tuple(video.shape)}")
        s = self.spatial_factor
        if video.shape[-2] % s or video.shape[-1] % s:
            raise ValueError(
                f"height and width must be multiples of {s}, got {video.shape[-2]}x{video.shape[-1]}"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, L, h, w), got shape {tuple(latents.shape)}"
            )

    # ------------------------------------------------------------------ encode / decode
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels -> normalised latents.

        Args:
            video: ``(B, 3, T, H, W)`` in [-1, 1], ``T = 4k + 1``, ``H, W`` multiples of 8.
            sample: draw from the posterior (with ``generator``) instead of taking its mean.
            generator: RNG for ``sample=True``.

        Returns:
            ``(B, C, 1 + (T - 1) / 4, H / 8, W / 8)`` in the VAE's dtype.
        """
        self._check_video(video)
        self.num_latent_frames(video.shape[2])
        if (video.shape[2] - 1) % 4 == 0:
            posterior = self.model.encode(video.to(self.device, self.dtype)).latent_dist
        else:  # diffusers' encode reads 4 frames at a time and would drop the tail of a 2x VAE's 4k + 3 frames
            posterior = DiagonalGaussianDistribution(StreamingEncoder(self).moments(video))
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels.

        Args:
            latents: ``(B, C, L, h, w)``.

        Returns:
            ``(B, 3, 1 + 4 (L - 1), 8 h, 8 w)`` clamped to [-1, 1], in the VAE's dtype.
        """
        self._check_latents(latents)
        z = self.denormalize(latents.to(self.device, self.dtype))
        return self.model.decode(z, return_dict=False)[0].clamp(-1.0, 1.0)


class StreamingDecoder:
    """Decode a long latent video chunk by chunk with ``AutoencoderKLWan``'s causal feature cache.

    The cache (two frames per causal convolution) is kept here, not on the model, so the wrapped VAE stays
    usable for other calls in between. Feeding the latents of a video in any split gives the same pixels as
    ``VideoVAE.decode`` on the whole video, at constant memory per chunk. Spatial tiling is not used.

    Args:
        vae: the VAE.

    Example:
        >>> dec = StreamingDecoder(vae)  # doctest: +SKIP
        >>> frames = [dec.decode_chunk(chunk) for chunk in latents.split(3, dim=2)]  # doctest: +SKIP
    """

    def __init__(self, vae: VideoVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video: drop the feature cache."""
        self._feat_map: list[Any] = [None] * self.vae.model._cached_conv_counts["decoder"]
        self._batch_shape: tuple[int, ...] | None = None
        self.latent_frames_in = 0
        self.frames_out = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next ``k`` latent frames.

        Args:
            latents: normalised ``(B, C, k, h, w)``; ``B``, ``h``, ``w`` fixed for the whole video.

        Returns:
            ``(B, 3, n, 8 h, 8 w)`` in [-1, 1] with ``n = 1 + 4 (k - 1)`` for the first chunk, ``4 k`` after.
        """
        vae, model = self.vae, self.vae.model
        vae._check_latents(latents)
        key = (latents.shape[0], *latents.shape[3:])
        if self._batch_shape is not None and key != self._batch_shape:
            raise ValueError(
                f"chunk batch/size {key} differs from the stream's {self._batch_shape}; call reset()"
            )
        self._batch_shape = key
        x = model.post_quant_conv(vae.denormalize(latents.to(vae.device, vae.dtype)))  # 1x1x1 conv: per frame
        outs = []
        for i in range(x.shape[2]):
            feat_idx = [0]
            outs.append(
                model.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_map,
                    feat_idx=feat_idx,
                    first_chunk=self.latent_frames_in == 0,
                )
            )
            self.latent_frames_in += 1
        out = torch.cat(outs, dim=2)
        if model.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=model.config.patch_size)
        self.frames_out += out.shape[2]
        return out.clamp(-1.0, 1.0)


class StreamingEncoder:
    """Encode a long pixel video chunk by chunk with ``AutoencoderKLWan``'s causal feature cache.

    The first chunk must have ``4k + 1`` frames, later chunks ``4k`` frames; the concatenated outputs equal
    ``VideoVAE.encode`` (posterior mean) of the whole video.

    Args:
        vae: the VAE.
    """

    def __init__(self, vae: VideoVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video: drop the feature cache."""
        self._feat_map: list[Any] = [None] * self.vae.model._cached_conv_counts["encoder"]
        self.frames_in = 0
        self.latent_frames_out = 0

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor) -> torch.Tensor:
        """Encode the next pixel frames.

        Args:
            video: ``(B, 3, t, H, W)`` in [-1, 1]; ``t = 4k + 1`` for the first chunk, ``4k`` (k >= 1) after.

        Returns:
            normalised latents ``(B, C, l, H / 8, W / 8)`` with ``l = 1 + k`` for the first chunk, ``k`` after.
        """
        return self.vae.normalize(DiagonalGaussianDistribution(self.moments(video)).mode())

    @torch.no_grad()
    def moments(self, video: torch.Tensor) -> torch.Tensor:
        """The posterior's raw ``(mean, logvar)`` of the next pixel frames (``encode_chunk`` before the mean and
        normalisation): ``(B, 2 C, l, H / 8, W / 8)``."""
        vae, model = self.vae, self.vae.model
        vae._check_video(video)
        f, t = vae.temporal_factor, video.shape[2]
        if self.frames_in == 0:
            vae.num_latent_frames(t)
            pieces = [(0, 1)] + [(s, s + f) for s in range(1, t, f)]
        else:
            if t == 0 or t % f:
                raise ValueError(f"chunks after the first need a multiple of {f} frames, got {t}")
            pieces = [(s, s + f) for s in range(0, t, f)]
        x = video.to(vae.device, vae.dtype)
        if model.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            x = patchify(x, patch_size=model.config.patch_size)
        outs = [model.encoder(x[:, :, a:b], feat_cache=self._feat_map, feat_idx=[0]) for a, b in pieces]
        h = model.quant_conv(torch.cat(outs, dim=2))
        self.frames_in += t
        self.latent_frames_out += h.shape[2]
        return h


def build_vae(
    preset: Preset,
    path: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> VideoVAE:
    """The VAE of ``preset``.

    Args:
        preset: ``preset.vae`` is ``"wan"`` (``path`` required) or ``"embedded"`` (``path`` optional; without
            it a randomly initialised, untrained embedded VAE is built with a fixed seed).
        path: local diffusers-layout folder.
        dtype, device: placement.

    Raises:
        ValueError: unknown ``preset.vae``, missing path for ``"wan"``, or latent channels that differ from
            ``preset.latent_channels``.
    """
    if preset.vae == "wan":
        if path is None:
            raise ValueError(
                f"preset {preset.name!r} uses the Wan VAE: pass the path of its diffusers folder"
            )
        vae = VideoVAE.from_pretrained(path, dtype=dtype, device=device)
    elif preset.vae == "embedded":
        if path is not None:
            vae = VideoVAE.from_pretrained(path, dtype=dtype, device=device)
        else:
            logger.warning(
                "no VAE weights given for preset %r: using a randomly initialised (untrained) embedded VAE",
                preset.name,
            )
            vae = VideoVAE.from_config_dict(embedded_vae_config(preset), dtype=dtype, device=device, seed=0)
    else:
        raise ValueError(
            f"unknown VAE kind {preset.vae!r} in preset {preset.name!r}; use 'embedded' or 'wan'"
        )
    if vae.latent_channels != preset.latent_channels:
        raise ValueError(
            f"VAE at {path} has {vae.latent_channels} latent channels, preset {preset.name!r} needs "
            f"{preset.latent_channels}"
        )
    if (vae.temporal_factor, vae.spatial_factor) != (preset.vae_temporal, preset.vae_spatial):
        raise ValueError(
            f"VAE compresses {vae.temporal_factor}x/{vae.spatial_factor}x (time/space), preset {preset.name!r} "
            f"expects {preset.vae_temporal}x/{preset.vae_spatial}x"
        )
    return vae
