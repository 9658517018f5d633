"""Distribution metrics with local weights: Frechet distance / FVD of VideoMAE clip features, CLIP score,
and the image encoders (DINO/CLIP) that can replace the fixed consistency descriptor. Nothing is downloaded."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..narrative import CompiledNarrative
from .consistency import as_float, as_uint8

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------- Frechet distance
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of features ``(N, D)`` (zero covariance when N < 2)."""
    f = np.asarray(feats, dtype=np.float64)
    if len(f) < 2:
        logger.warning("only %d feature vector(s): covariance taken as zero", len(f))
        return f.mean(0), np.zeros((f.shape[1], f.shape[1]))
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is computed without scipy as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), via ``eigh``.

    Args:
        mu1, mu2: ``(D,)`` means; sigma1, sigma2: ``(D, D)`` covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(((r @ s2 @ r) + (r @ s2 @ r).T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------------------- local models
def _load_local(cls: Any, path: str | os.PathLike[str], what: str) -> Any:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"cannot load {what} from {p}: not a directory (local weights only, nothing is downloaded)"
        )
    try:
        return cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True)  # never a pickle
    except Exception as exc:  # transformers raises many types; report one line
        text = str(exc).strip().splitlines()
        raise ValueError(f"cannot load {what} from {p}: {text[0] if text else type(exc).__name__}") from None


def _norm_stats(path: str | os.PathLike[str], mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    cfg_file = Path(path).expanduser() / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _prepare(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Resize the short side to ``size`` (bilinear, antialiased), centre-crop ``size x size``, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return (x[..., top : top + size, left : left + size] - mean) / std


def _pooled(out: Any) -> torch.Tensor:
    """Tensor or a model output's ``pooler_output`` (transformers 5 returns outputs from get_*_features)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageEncoder:
    """A pretrained image encoder from a local folder as a ``FeatureFn`` (DINO/DINOv2, CLIP, ...).

    Loaded with ``transformers.AutoModel`` (``local_files_only``). The feature is CLIP's projected image
    embedding for a ``CLIPModel``, else ``pooler_output`` (DINOv2: the normed CLS token), else the first
    token of ``last_hidden_state``. Images are short-side resized and centre-cropped to the model's
    ``image_size`` and normalised with the folder's ``preprocessor_config.json`` (if absent: CLIP's statistics
    for CLIP, ImageNet's otherwise).

    Args:
        path: local model folder.
        device: torch device.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel

        self.model = _load_local(AutoModel, path, "image encoder").eval().to(device)
        vision = getattr(self.model.config, "vision_config", self.model.config)
        self.size, self.device = int(vision.image_size), torch.device(device)
        is_clip = hasattr(self.model, "get_image_features")
        self.mean, self.std = _norm_stats(
            path, *((CLIP_MEAN, CLIP_STD) if is_clip else (IMAGENET_MEAN, IMAGENET_STD))
        )
        self.name = f"{type(self.model).__name__} from {Path(path).expanduser()}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _prepare(images, self.size, self.mean, self.std).to(self.device)
        if hasattr(self.model, "get_image_features"):
            return _pooled(self.model.get_image_features(pixel_values=x))
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class VideoMAEFeatures:
    """Clip features for FVD from a ``transformers`` ``VideoMAEModel`` in a local folder (CD-FVD uses VideoMAE).

    A video is cut into clips of ``config.num_frames`` frames every ``stride`` frames (a video shorter than
    one clip is padded by repeating its last frame); frames are resized/centre-cropped to
    ``config.image_size`` and normalised (ImageNet statistics unless the folder has a preprocessor config);
    a clip's feature is the mean of the encoder's last hidden states over all tokens.

    Args:
        path: local model folder (``config.json`` + safetensors).
        device: torch device.
        batch_size: clips per forward pass.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu", batch_size: int = 4):
        from transformers import VideoMAEModel

        self.model = _load_local(VideoMAEModel, path, "VideoMAE model").eval().to(device)
        self.num_frames, self.size = int(self.model.config.num_frames), int(self.model.config.image_size)
        self.mean, self.std = _norm_stats(path, IMAGENET_MEAN, IMAGENET_STD)
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = f"{type(self.model).__name__} from {Path(path).expanduser()}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, stride: int | None = None) -> np.ndarray:
        """Args: frames ``uint8 (T, H, W, 3)``; stride: clip step (default: ``num_frames``).

        Returns: ``(num_clips, hidden_size)`` float64."""
        frames, n = as_uint8(frames), self.num_frames
        if len(frames) < n:
            frames = np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])
        starts = list(range(0, len(frames) - n + 1, stride or n))
        feats = []
        for i in range(0, len(starts), self.batch_size):
            clips = [
                _prepare(as_float(frames[s : s + n]), self.size, self.mean, self.std)
                for s in starts[i : i + self.batch_size]
            ]
            out = self.model(pixel_values=torch.stack(clips).to(self.device))
            feats.append(out.last_hidden_state.mean(1).double().cpu())
        return torch.cat(feats).numpy()


def fvd(gen_features: np.ndarray, ref_features: np.ndarray) -> float:
    """Frechet distance between two sets of clip features ``(N, D)`` (from ``VideoMAEFeatures``).

    egolcd's own implementation, not the ``cd-fvd`` reference package (it needs torchvision, which does not
    install beside our CPU torch; see :mod:`egolcd.metrics`). Differences from cd-fvd's VideoMAE CD-FVD,
    which make the numbers incomparable: cd-fvd uses VideoMAE-v2 ViT-g (SSv2 fine-tuned) ``forward_features``
    on 16-frame clips squashed to 224x224 without normalisation, and the biased covariance (1/N); here any
    ``transformers`` ``VideoMAEModel``, short-side resize + centre crop + normalisation, the mean of the last
    hidden states, and the unbiased covariance (1/(N-1)).
    """
    return frechet_distance(*feature_stats(gen_features), *feature_stats(ref_features))


class ClipScorer:
    """CLIP score with a ``transformers`` ``CLIPModel`` and its tokenizer from a local folder.

    Image embeddings come from frames short-side resized/centre-cropped to the vision ``image_size`` and
    normalised (CLIP statistics unless the folder has a preprocessor config); text embeddings from the
    folder's real tokenizer (``AutoTokenizer``, truncated to the text model's context length; our long SNP
    prompts may be cut there).

    Args:
        path: local model folder with a CLIP model and tokenizer.
        device: torch device.
    """

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.model = _load_local(CLIPModel, path, "CLIP model").eval().to(device)
        self.tokenizer = _load_local(AutoTokenizer, path, "CLIP tokenizer")
        self.size = int(self.model.config.vision_config.image_size)
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self.mean, self.std = _norm_stats(path, CLIP_MEAN, CLIP_STD)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, D)`` unit-norm embeddings."""
        x = _prepare(images, self.size, self.mean, self.std).to(self.device)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=x)).float().cpu(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> ``(P, D)`` unit-norm embeddings."""
        tok = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return F.normalize(_pooled(out).float().cpu(), dim=-1)

    def segment_scores(
        self, frames: np.ndarray, compiled: CompiledNarrative, per_segment: int = 8
    ) -> list[float]:
        """Mean cosine(frame embedding, segment prompt embedding) per segment, ``per_segment`` frames each
        (evenly spaced); ``nan`` for segments past the video's end."""
        frames, text = as_uint8(frames), self.text_embeddings(list(compiled.prompts))
        out = []
        for i, (start, n) in enumerate(zip(compiled.segment_start_frames, compiled.segment_frames)):
            idx = np.unique(np.linspace(start, start + n - 1, min(per_segment, n)).round().astype(int))
            idx = idx[idx < len(frames)]
            out.append(
                float((self.image_embeddings(as_float(frames[idx])) @ text[i]).mean())
                if idx.size
                else math.nan
            )
        return out
