"""Dataclass configs and the preset registry.

A preset selects *sizes only*; every preset runs the same code path (DESIGN.md).

    >>> from egolcd.config import PRESETS
    >>> PRESETS["tiny"].transformer["num_layers"]
    2
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MEMORY_POLICIES = ("egolcd", "dense", "window", "sink-window", "none")


@dataclass
class MemoryConfig:
    """What each chunk may see (METHOD.md, "Our formulation").

    Args:
        policy: one of ``MEMORY_POLICIES``.
        window_chunks: W, the number of most recent chunks kept dense in the short-term window.
        sink: keep the first chunk visible forever (used by ``egolcd`` and ``sink-window``).
        keep_ratio: rho; a chunk leaving the window keeps ``ceil(rho * n)`` tokens per layer.
        top_m: number of long-term entries retrieved per chunk.
        threshold: optional minimum cosine similarity for a retrieved entry.
        max_entries: long-term store budget in entries.
        max_tokens: long-term store budget in tokens per layer (``None``: ``max_entries * k``).
        offload_long_term: device the long-term store's keys/values live on (e.g. ``"cpu"`` to keep GPU
            memory for the window); ``None`` keeps them on the compute device. Retrieved entries are
            copied back per chunk.
        importance_query_stride: importance (attention mass received) is averaged over every s-th query
            of the chunk: 1 is exact (METHOD.md); s > 1 is an unbiased estimate at 1/s of that pass's cost.
        align_revisits: the j-th chunk of a segment that revisits an earlier one reads that segment's
            entries ranked by how far their place in it is from j, the nearest in the slot next to the sink
            (a fixed offset from the current chunk); ``False``: forced entries most recent first, all
            retrieved slots in time order (METHOD.md, "Retrieve").
        revisit_position: where that aligned entry sits in frame positions: ``"slot"``, the last retrieved
            slot, next to the sink (a fixed offset of ``(W + 2) * chunk_frames`` frames); ``"current"``, the
            current chunk's own frame positions (offset 0: each token meets the token of the same frame and
            place in the first visit at relative position zero, the peak of rotary attention).
    """

    policy: str = "egolcd"
    window_chunks: int = 2
    sink: bool = True
    keep_ratio: float = 0.25
    top_m: int = 2
    threshold: float | None = None
    max_entries: int = 32
    max_tokens: int | None = None
    offload_long_term: str | None = None
    importance_query_stride: int = 1
    align_revisits: bool = True
    revisit_position: str = "slot"

    def __post_init__(self) -> None:
        if self.policy not in MEMORY_POLICIES:
            raise ValueError(f"unknown memory policy {self.policy!r}; choose one of {', '.join(MEMORY_POLICIES)}")
        if self.window_chunks < 1:
            raise ValueError(f"window_chunks must be >= 1, got {self.window_chunks}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.top_m < 0 or self.max_entries < 0:
            raise ValueError("top_m and max_entries must be >= 0")
        if self.revisit_position not in ("slot", "current"):
            raise ValueError(f"revisit_position must be 'slot' or 'current', got {self.revisit_position!r}")
        if self.importance_query_stride < 1:
            raise ValueError(f"importance_query_stride must be >= 1, got {self.importance_query_stride}")


@dataclass
class Preset:
    """A named size: transformer config (diffusers ``WanTransformer3DModel`` keys + ``chunk_frames``),
    latent geometry and default video size.

    Args:
        name: registry key.
        transformer: keyword arguments of ``EgoLCDTransformer3DModel``.
        vae: ``"embedded"`` (small VAE shipped with egolcd) or ``"wan"`` (``AutoencoderKLWan`` from a path).
        text_encoder: ``"minilm"`` (embedded all-MiniLM-L6-v2, 384-d) or ``"umt5"`` (from a path).
        vae_temporal: latent frames = 1 + (pixel frames - 1) / vae_temporal.
        vae_spatial: pixel size / latent size.
        height, width, fps: default video geometry.
        memory: default memory configuration.
        text_max_length: padded text tokens (Wan2.1 and its umT5 pad to 512).
    """

    name: str
    transformer: dict[str, Any]
    vae: str = "embedded"
    text_encoder: str = "minilm"
    vae_temporal: int = 4
    vae_spatial: int = 8
    height: int = 480
    width: int = 640
    fps: int = 16
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    text_max_length: int = 128

    @property
    def chunk_frames(self) -> int:
        return int(self.transformer["chunk_frames"])

    @property
    def latent_channels(self) -> int:
        return int(self.transformer["in_channels"])

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)


def _wan(num_heads: int, ffn_dim: int, num_layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
        chunk_frames=3,
    )


# The embedded default, trained on CPU on simulated egocentric footage (64x64, Memory Maze's native
# size): < 50 MB in safetensors with its VAE. The VAE compresses 4x in space (16x16 latents) and the
# DiT patches 4x4, so a frame is 16 tokens, as cheap as 8x + 2x2 but reconstructed far better. The DiT
# is small (6 layers, width 128) so that the whole recipe trains on 2 CPU cores in about 100 minutes.
_DEMO = Preset(
    name="demo",
    transformer=dict(
        patch_size=(1, 4, 4),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=8,
        out_channels=8,
        text_dim=384,
        freq_dim=128,
        ffn_dim=512,
        num_layers=6,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
        chunk_frames=3,
    ),
    vae_temporal=4,
    vae_spatial=4,
    height=64,
    width=64,
    fps=8,
    memory=MemoryConfig(window_chunks=2, keep_ratio=0.5, top_m=3, max_entries=32),
)


PRESETS: dict[str, Preset] = {
    # Tests: seconds on CPU. Text dim 384 = the embedded MiniLM encoder.
    "tiny": Preset(
        name="tiny",
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=384,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
            chunk_frames=2,
        ),
        vae_temporal=4,
        vae_spatial=8,
        height=64,
        width=64,
        fps=8,
        memory=MemoryConfig(window_chunks=2, keep_ratio=0.25, top_m=2, max_entries=8),
    ),
    "demo": _DEMO,
    # The demo geometry with half the temporal compression: the VAE packs 2 frames to a latent frame (it
    # reconstructs far better than 4: benchmarks/NOTES.md) and the DiT patches 2 latent frames to a token
    # frame, so a chunk (6 latent frames = 12 pixel frames) is 3 token frames of 16 tokens, as in `demo`. A token
    # then carries 256 latent numbers, so the DiT is twice as wide (8 heads x 32, ffn 1,024; 7.1 M parameters):
    # at demo's width 128 it barely read its memory (benchmarks/NOTES.md, 2026-12-04 sixth and seventh sessions).
    "demo-t2": _DEMO.replace(
        name="demo-t2",
        transformer={**_DEMO.transformer, "patch_size": (2, 4, 4), "chunk_frames": 6, "num_attention_heads": 8,
                     "ffn_dim": 1024},
        vae_temporal=2,
        memory=dataclasses.replace(_DEMO.memory),
    ),
    # The published Wan2.1 sizes (text encoder umT5-XXL, 4096-d; Wan VAE, 16 latent channels).
    "wan2.1-1.3b": Preset(
        name="wan2.1-1.3b",
        transformer=_wan(num_heads=12, ffn_dim=8960, num_layers=30),
        vae="wan",
        text_encoder="umt5",
        height=480,
        width=832,
        fps=16,
        memory=MemoryConfig(window_chunks=3, keep_ratio=0.25, top_m=2, max_entries=32),
        text_max_length=512,
    ),
    "wan2.1-14b": Preset(
        name="wan2.1-14b",
        transformer=_wan(num_heads=40, ffn_dim=13824, num_layers=40),
        vae="wan",
        text_encoder="umt5",
        height=480,
        width=832,
        fps=16,
        memory=MemoryConfig(window_chunks=3, keep_ratio=0.25, top_m=2, max_entries=32),
        text_max_length=512,
    ),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name with a clear error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


#: ``train-vae``'s option choices, here (no torch) so that the command-line parser and ``VAETrainConfig``
#: read one definition: reconstruction error, what is decoded, the learning-rate schedule.
VAE_TRAIN_CHOICES: dict[str, tuple[str, ...]] = {
    "loss": ("l1", "mse"),
    "posterior": ("sample", "mode"),
    "lr_schedule": ("constant", "cosine"),
    "precision": ("fp32", "bf16"),
}
