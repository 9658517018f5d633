"""EgoLCDTransformer3DModel: the Wan2.1 DiT, block-causal, with explicit memory context.

Parameter names equal diffusers' ``WanTransformer3DModel``, so a Wan2.1 (or Self-Forcing / CausVid /
LongLive) checkpoint in diffusers layout loads with ``from_pretrained`` with no missing or unexpected
keys. The model is a pure function of (latent chunk, per-frame timesteps, text tokens, memory context):
memory objects are passed in and returned, never stored on the module (DESIGN.md).

Two entry points:

* ``forward`` - the whole latent video at once, called like ``WanTransformer3DModel``. With
  ``chunk_frames=None`` (or ``>= F``) it is the same function as Wan; with ``chunk_frames=K < F`` the
  self-attention is block-causal (bidirectional inside a chunk of K frames, causal across chunks).
  A temporal patch ``p_t > 1`` (the ``demo-t2`` preset: 2) makes a chunk ``K / p_t`` token frames; rotary
  frame positions still count latent frames (``p_t`` apart), so memory offsets are in latent frames for
  every patch size (for ``p_t = 1``, every Wan2.1 checkpoint, this is Wan's own token index).
* ``forward_chunk`` - one chunk with an explicit per-layer memory context (``LayerKV``: pre-RoPE keys,
  values and grid positions); returns the chunk's own keys/values for writing into memory, and on
  request the attention mass the context received (importance) and the memory/full-history attention
  outputs used by the Memory Regulation Loss.

The block itself is :class:`egolcd.transformer_block.EgoLCDTransformerBlock`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding
from torch import Tensor

from .attention import LayerKV, block_causal_mask, grid_positions, rope_cos_sin, rope_freqs
from .limits import check_safetensors_folder
from .transformer_block import EgoLCDTransformerBlock, _LayerIO


@dataclass
class ChunkOutput:
    """What ``forward_chunk`` returns.

    Args:
        sample: ``(B, C, K, H, W)`` the model output (flow velocity) for the chunk.
        kv: per layer, the chunk's own keys/values (pre-RoPE) and positions, when asked for.
        attention_mass: per layer, ``(B, T_ctx)`` mean attention probability each context token received.
        memory_outputs: per layer, ``(O_mem, O_full)`` self-attention outputs of the chunk's queries with
            the given context and with the ``reference_context`` (no gradient), each ``(B, N, heads*d)``.
    """

    sample: Tensor
    kv: list[LayerKV] | None = None
    attention_mass: list[Tensor] | None = None
    memory_outputs: list[tuple[Tensor, Tensor]] | None = None


@dataclass
class PromptCache:
    """What depends only on a prompt, computed once per segment prompt (``prompt_cache``) and reused by
    every denoising step and clean pass of every chunk of that segment (the inference fast path; training
    passes the token states and recomputes, so gradients reach the weights).

    Valid for the weights it was computed with: make a new one after changing them (LoRA, training).

    Args:
        text: ``(B, L, D)`` text tokens after the condition embedder's text projection.
        cross_kv: per layer, the cross-attention keys (after ``norm_k``) and values, each ``(B, L, heads, d)``.
        input_dtype: dtype of the token states it was made from (the timestep embedding is cast to it).
    """

    text: Tensor
    cross_kv: list[tuple[Tensor, Tensor]]
    input_dtype: torch.dtype



class EgoLCDTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""The Wan2.1 video DiT with block-causal attention and explicit long-context memory.

    Args:
        patch_size: 3D patch ``(t, h, w)``; Wan2.1 uses ``(1, 2, 2)``.
        num_attention_heads, attention_head_dim: heads and their width.
        in_channels, out_channels: latent channels (16 for the Wan VAE).
        text_dim: width of the text encoder's token states (4096 for umT5-XXL).
        freq_dim: sinusoidal timestep embedding width.
        ffn_dim: feed-forward hidden width.
        num_layers: number of blocks.
        cross_attn_norm, qk_norm, eps: as in Wan2.1.
        image_dim, added_kv_proj_dim, pos_embed_seq_len: Wan image-to-video fields (kept for loading).
        rope_max_seq_len: kept for config compatibility; positions are computed on the fly, unbounded.
        chunk_frames: latent frames per chunk for block-causal attention; ``None`` = one chunk.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["EgoLCDTransformerBlock"]
    _repeated_blocks = ["EgoLCDTransformerBlock"]  # regional torch.compile (compile_repeated_blocks)
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        chunk_frames: int | None = None,
    ) -> None:
        super().__init__()
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1 or None, got {chunk_frames}")
        if chunk_frames is not None and chunk_frames % patch_size[0]:
            raise ValueError(f"chunk_frames ({chunk_frames}) must be a multiple of the temporal patch {patch_size[0]}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        # 1. Patch embedding (positions: rotary, computed at read time)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        # 2. Condition embeddings
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [
                EgoLCDTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for _ in range(num_layers)
            ]
        )
        # 4. Output norm & projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.gradient_checkpointing = False
        # Inference fast path (no gradient, eager): fused elementwise kernels and one-pass importance.
        # False runs the plain path everywhere (equality tests); training always runs the plain path.
        self.fast_path = True

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> EgoLCDTransformer3DModel:
        """diffusers' ``from_pretrained`` restricted to safetensors (never a pickle ``.bin``: loading one
        runs code from the file) and to floating-point weights; each refusal is one ``ValueError`` line."""
        from pathlib import Path

        if kwargs.get("use_safetensors") is False:
            raise ValueError("egolcd loads weights from safetensors only (use_safetensors=False refused)")
        kwargs["use_safetensors"] = True
        folder = Path(str(pretrained_model_name_or_path))
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        if folder.is_dir():
            check_safetensors_folder(folder)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError):
            raise
        except Exception as exc:  # SafetensorError (a truncated or garbage file) and the like
            raise ValueError(f"cannot load the transformer weights in {folder}: {' '.join(str(exc).split())}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EgoLCDTransformer3DModel:
        """Random-initialised model of a registered size (``egolcd.config.PRESETS``)."""
        from .config import get_preset

        return cls(**{**get_preset(name).transformer, **overrides})

    def to_dtype(self, dtype: torch.dtype) -> EgoLCDTransformer3DModel:
        """Cast in place as ``from_pretrained(torch_dtype=dtype)`` does: parameters of the modules in
        ``_keep_in_fp32_modules`` (timestep MLP, modulation tables, norms) stay float32."""
        keep = set(self._keep_in_fp32_modules)
        with torch.no_grad():
            for name, param in self.named_parameters():
                target = torch.float32 if keep.intersection(name.split(".")) else dtype
                param.data = param.data.to(target)
        return self

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_dim(self) -> int:
        return int(self.config.attention_head_dim)

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one token frame (``p_t`` latent frames) of an ``height x width`` latent."""
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def tokens_per_chunk(self, height: int, width: int) -> int:
        """Tokens of one chunk (``chunk_frames`` latent frames) of an ``height x width`` latent."""
        return int(self.config.chunk_frames) // self.config.patch_size[0] * self.tokens_per_frame(height, width)

    def _embed(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, int, int]]:
        """1. Patchify; 2. per-frame timestep and text embeddings."""
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if f % p_t or h % p_h or w % p_w:
            raise ValueError(f"latent size {(f, h, w)} is not divisible by the patch size {(p_t, p_h, p_w)}")
        grid = (f // p_t, h // p_h, w // p_w)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, F*H*W, D)

        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.ndim == 1:  # (B,) -> (B, F): every frame the same noise level
            timestep = timestep[:, None].expand(b, f)
        if timestep.shape != (b, f):
            raise ValueError(f"timestep must be (B,) or (B, F) = {(b, f)}, got {tuple(timestep.shape)}")
        timestep = timestep[:, ::p_t]  # one level per latent frame after temporal patching
        if isinstance(encoder_hidden_states, PromptCache):  # the text projection was done once per prompt
            if encoder_hidden_states_image is not None:
                raise ValueError("a PromptCache does not take image tokens (text-to-video models only)")
            temb, timestep_proj = self._time_embedding(timestep.flatten(), grid[0], encoder_hidden_states.input_dtype)
            return x, temb, timestep_proj.unflatten(2, (6, -1)), encoder_hidden_states.text, grid
        temb, timestep_proj, text, image = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=grid[0]
        )
        timestep_proj = timestep_proj.unflatten(2, (6, -1))  # (B, F, 6, D)
        if image is not None:
            text = torch.cat([image, text], dim=1)
        return x, temb, timestep_proj, text, grid

    def _time_embedding(self, timestep: Tensor, frames: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The timestep half of ``WanTimeTextImageEmbedding.forward`` (same operations and casts)."""
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep).unflatten(0, (-1, frames))
        time_dtype = next(iter(ce.time_embedder.parameters())).dtype
        if t.dtype != time_dtype and time_dtype != torch.int8:
            t = t.to(time_dtype)
        temb = ce.time_embedder(t).to(dtype)  # type_as(encoder_hidden_states) in diffusers
        return temb, ce.time_proj(ce.act_fn(temb))

    @torch.no_grad()
    def prompt_cache(self, encoder_hidden_states: Tensor) -> PromptCache:
        """The per-prompt work of ``forward_chunk`` done once: the text projection and every layer's
        cross-attention keys/values. Pass the result as ``encoder_hidden_states`` (inference only).

        Args:
            encoder_hidden_states: ``(B, L, text_dim)`` text token states of one prompt.
        """
        if any(block.attn2.add_k_proj is not None for block in self.blocks):
            raise ValueError("prompt_cache supports text-to-video models only (this one has image cross-attention)")
        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        return PromptCache(text, [block.cross_kv(text) for block in self.blocks], encoder_hidden_states.dtype)

    def _run_blocks(self, x: Tensor, text: Tensor, timestep_proj: Tensor, ios: Sequence[_LayerIO]) -> Tensor:
        for block, io in zip(self.blocks, ios):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, timestep_proj, io)
            else:
                x = block(x, text, timestep_proj, io)
        return x

    def _unpatchify(self, x: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """5. Output norm (per-frame shift/scale), projection and unpatchify."""
        b, n, d = x.shape
        f, h, w = grid
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        y = self.norm_out(x.float()).view(b, f, h * w, d)  # (B, F, H*W, D)
        x = (y * (1 + scale) + shift).view(b, n, d).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(b, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F*p_t, H*p_h, W*p_w)

    # ------------------------------------------------------------------ entry points
    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_image: Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """Whole-video forward, called like ``WanTransformer3DModel``.

        Args:
            hidden_states: ``(B, C, F, H, W)`` noisy latents.
            timestep: ``(B,)`` or per-frame ``(B, F)`` in Wan's 0..1000 scale.
            encoder_hidden_states: ``(B, L, text_dim)`` text token states.
            encoder_hidden_states_image: optional image tokens (Wan I2V checkpoints).

        Returns:
            ``(B, C, F, H, W)`` prediction (``Transformer2DModelOutput.sample`` or a 1-tuple).
        """
        b = hidden_states.shape[0]
        # 1-2. Patchify and embed conditions
        x, temb, timestep_proj, text, grid = self._embed(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        f, h, w = grid
        p_t = self.config.patch_size[0]
        pos = grid_positions(b, f, h, w, device=x.device, frame_stride=p_t)  # (B, N, 3)
        cos, sin = rope_cos_sin(pos, self.head_dim)
        # 3. Block-causal mask when the video spans several chunks (of K / p_t token frames)
        k = None if self.config.chunk_frames is None else self.config.chunk_frames // p_t
        mask = block_causal_mask(f, h * w, k, device=x.device) if k is not None and k < f else None
        ios = [_LayerIO(cos=cos, sin=sin, pos=pos, mask=mask) for _ in self.blocks]
        # 4. Transformer blocks
        x = self._run_blocks(x, text, timestep_proj, ios)
        # 5. Output
        out = self._unpatchify(x, temb, grid)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _chunk_rotary(
        self, b: int, f: int, h: int, w: int, frame_start: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positions, cos/sin and complex rotary factors of a chunk's grid (inference fast path), kept for the
        last few grids asked for: a chunk's denoising steps and clean pass all ask for the same one."""
        key = (b, f, h, w, int(frame_start), str(device))
        memo = self.__dict__.setdefault("_rotary_memo", {})
        if key not in memo:
            if len(memo) >= 8:
                memo.clear()
            pos = grid_positions(b, f, h, w, frame_start, device, self.config.patch_size[0])  # (B, N, 3)
            cos, sin = rope_cos_sin(pos, self.head_dim)
            memo[key] = (pos, cos, sin, rope_freqs(cos, sin))
        return memo[key]

    def forward_chunk(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | PromptCache,
        context: Sequence[LayerKV] | None = None,
        frame_start: int = 0,
        reference_context: Sequence[LayerKV] | None = None,
        return_kv: bool = False,
        return_attention_mass: bool = False,
        attention_mass_stride: int = 1,
        encoder_hidden_states_image: Tensor | None = None,
        attention_mass_from: int = 0,
    ) -> ChunkOutput:
        """One chunk with an explicit memory context.

        Args:
            hidden_states: ``(B, C, K, H, W)`` latents of the current chunk.
            timestep: ``(B,)`` or ``(B, K)`` in Wan's 0..1000 scale.
            encoder_hidden_states: ``(B, L, text_dim)`` text tokens of the chunk's segment prompt, or their
                ``PromptCache`` (inference: text projection and cross-attention keys/values done once).
            context: one ``LayerKV`` per layer (may be empty): memory tokens, keys before rotary encoding,
                frame positions already in the coordinate system of this call.
            frame_start: frame position of the chunk's first latent frame in that coordinate system.
            reference_context: optional per-layer full-history context; the chunk's queries also attend
                to it (no gradient) and both outputs are returned (Memory Regulation Loss).
            return_kv: return the chunk's own keys/values (pre-RoPE) for writing into memory.
            return_attention_mass: return per layer the mean attention probability of each context token.
            attention_mass_stride: average that probability over every ``s``-th query only (an unbiased
                estimate at ``1/s`` of the cost; 1 = all queries, exact).
            attention_mass_from: score only context tokens from this index on (the returned mass is
                ``(B, T_ctx - attention_mass_from)``; keys before it are not scored at all).
        """
        b = hidden_states.shape[0]
        n_layers = self.num_layers
        for name, ctx in (("context", context), ("reference_context", reference_context)):
            if ctx is not None and len(ctx) != n_layers:
                raise ValueError(f"{name} has {len(ctx)} layers, the model has {n_layers}")
        # 1-2. Patchify and embed conditions
        x, temb, timestep_proj, text, grid = self._embed(
            hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        f, h, w = grid
        cache = encoder_hidden_states if isinstance(encoder_hidden_states, PromptCache) else None
        if cache is not None and torch.is_grad_enabled():
            raise ValueError("a PromptCache is for inference (no gradient); training passes the token states")
        fast = self.fast_path and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if fast:  # the same positions for every denoising step and the clean pass of a chunk: made once
            pos, cos, sin, freqs = self._chunk_rotary(b, f, h, w, frame_start, x.device)
        else:
            pos = grid_positions(b, f, h, w, frame_start, x.device, self.config.patch_size[0])  # (B, N, 3)
            cos, sin = rope_cos_sin(pos, self.head_dim)
            freqs = None
        ios = [
            _LayerIO(
                cos=cos,
                sin=sin,
                pos=pos,
                context=None if context is None else context[i],
                reference=None if reference_context is None else reference_context[i],
                want_kv=return_kv,
                want_mass=return_attention_mass,
                mass_stride=attention_mass_stride,
                mass_from=attention_mass_from,
                fast=fast,
                freqs=freqs,
                cross_kv=None if cache is None else cache.cross_kv[i],
            )
            for i in range(n_layers)
        ]
        # 3. Transformer blocks over [context + chunk]
        x = self._run_blocks(x, text, timestep_proj, ios)
        # 4. Output
        out = self._unpatchify(x, temb, grid)
        return ChunkOutput(
            sample=out,
            kv=[io.kv for io in ios] if return_kv else None,  # type: ignore[misc]
            attention_mass=[io.mass for io in ios] if return_attention_mass else None,  # type: ignore[misc]
            memory_outputs=[io.memory_output for io in ios] if reference_context is not None else None,  # type: ignore[misc]
        )
