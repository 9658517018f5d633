"""Text encoders: the embedded MiniLM (offline) and T5/umT5 with a tiny random model (CPU, no network)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from egolcd.text import (
    CacheInfo,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEmbedding,
    TextEncoder,
    load_text_encoder,
)

MUG = "rinse a mug at the kitchen sink"
CUP = "wash a cup at the sink"
CAR = "drive a car on a highway"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test; the hub is offline too."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network")))
        return MiniLMTextEncoder(max_length=16)


# ------------------------------------------------------------------------------------------- MiniLM


def test_minilm_shapes_and_norm(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == minilm.pooled_dim == 384 and minilm.max_length == 16
    emb = minilm.encode([MUG, CUP, CAR])
    assert isinstance(emb, TextEmbedding) and len(emb) == 3
    assert emb.tokens.shape == (3, 16, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (3, 16) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (3, 384)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(3))
    assert not emb.tokens.requires_grad and not emb.pooled.requires_grad


def test_minilm_zero_padding(minilm):
    emb = minilm.encode(["a mug", "the camera wearer rinses a blue mug under the tap at the white sink " * 3])
    # "[CLS] a mug [SEP]" = 4 tokens; the long prompt fills all 16.
    assert emb.mask.sum(1).tolist() == [4, 16]
    assert torch.all(emb.tokens[0, 4:] == 0) and torch.all(emb.tokens[0, :4].abs().sum(-1) > 0)
    assert emb.mask[0, :4].all() and not emb.mask[0, 4:].any()


def test_minilm_semantics(minilm):
    p = minilm.encode([MUG, CUP, CAR]).pooled
    sim = p @ p.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm.model_dir), device="cpu")
    ref = model.encode([MUG, CAR], convert_to_tensor=True)
    torch.testing.assert_close(minilm.encode([MUG, CAR]).pooled, ref, atol=1e-5, rtol=1e-4)


def test_minilm_deterministic_and_cached(minilm):
    minilm.clear_cache()
    first = minilm.encode([MUG, CAR])
    assert minilm.cache_info() == CacheInfo(hits=0, misses=2, size=2, max_size=1024)
    again = minilm.encode([CAR, MUG, MUG, "  rinse a mug   at the kitchen sink "])
    assert minilm.cache_info().hits == 4 and minilm.cache_info().misses == 2
    torch.testing.assert_close(again.select(1).tokens, first.select(0).tokens, rtol=0, atol=0)
    torch.testing.assert_close(again.select([2, 3]).pooled, first.pooled[[0, 0]], rtol=0, atol=0)
    # A fresh encode of the same prompt (cache cleared) gives the same numbers.
    minilm.clear_cache()
    fresh = minilm.encode([MUG, CAR])
    torch.testing.assert_close(fresh.tokens, first.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh.pooled, first.pooled, rtol=0, atol=1e-6)


def test_minilm_batch_order_and_duplicates(minilm):
    minilm.clear_cache()
    emb = minilm.encode([CAR, MUG, CAR])
    assert minilm.cache_info().misses == 2 and minilm.cache_info().hits == 1
    torch.testing.assert_close(emb.pooled[0], emb.pooled[2], rtol=0, atol=0)
    single = minilm.encode(MUG)
    assert len(single) == 1
    torch.testing.assert_close(single.pooled[0], emb.pooled[1], rtol=0, atol=0)


def test_empty_batch_and_bad_input(minilm):
    emb = minilm.encode([])
    assert emb.tokens.shape == (0, 16, 384) and emb.pooled.shape == (0, 384)
    with pytest.raises(TypeError, match="prompts must be strings"):
        minilm.encode([3])


def test_cache_bound():
    class Fake(TextEncoder):
        dim = pooled_dim = 2

        def _encode_batch(self, prompts):
            b = len(prompts)
            return TextEmbedding(torch.ones(b, 3, 2), torch.ones(b, 3, dtype=torch.bool), torch.ones(b, 2))

    enc = Fake(max_length=3, cache_size=2)
    enc.encode(["a", "b", "c"])
    assert enc.cache_info().size == 2
    enc.encode(["a"])  # evicted first -> encoded again
    assert enc.cache_info().misses == 4
    emb = enc.encode(["a", "c"]).to(dtype=torch.float16)
    assert emb.tokens.dtype == torch.float16 and emb.mask.dtype == torch.bool


def test_load_text_encoder_factory(minilm):
    with pytest.raises(ValueError, match="unknown text encoder 'clip'"):
        load_text_encoder("clip")
    with pytest.raises(ValueError, match="needs a path"):
        load_text_encoder("umt5")
    enc = load_text_encoder("minilm", max_length=8)
    assert isinstance(enc, MiniLMTextEncoder) and enc.encode([MUG]).tokens.shape == (1, 8, 384)


# ------------------------------------------------------------------------------------------- T5/umT5


def _tiny_t5(directory: Path, kind: str = "umt5", layout: str = "flat") -> Path:
    """Save a tiny random T5/umT5 encoder and a (BERT WordPiece) tokenizer: no download needed."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from egolcd.text import _minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True)
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if kind == "umt5" else (T5Config, T5EncoderModel)
    config = cfg_cls(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = model_cls(config)
    if layout == "wan":  # diffusers pipeline layout: text_encoder/ + tokenizer/
        model.save_pretrained(directory / "text_encoder")
        tokenizer.save_pretrained(directory / "tokenizer")
    else:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_umt5(tmp_path_factory) -> Path:
    return _tiny_t5(tmp_path_factory.mktemp("umt5"))


def test_t5_shapes_padding_and_pooled(tiny_umt5):
    from transformers import UMT5EncoderModel

    enc = T5TextEncoder(str(tiny_umt5), max_length=12)
    assert isinstance(enc.model, UMT5EncoderModel) and enc.dim == enc.pooled_dim == 32
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    emb = enc.encode(["a mug", "the camera wearer rinses a blue mug under the tap at the white sink"])
    assert emb.tokens.shape == (2, 12, 32) and emb.mask.shape == (2, 12) and emb.pooled.shape == (2, 32)
    assert emb.mask.sum(1).tolist() == [4, 12]
    # Zero past the mask, as WanPipeline._get_t5_prompt_embeds does.
    assert torch.all(emb.tokens[0, 4:] == 0) and torch.all(emb.tokens[0, :4].abs().sum(-1) > 0)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))
    # pooled = L2-normalised mean of the unpadded states.
    mean = emb.tokens[0, :4].mean(0)
    torch.testing.assert_close(emb.pooled[0], mean / mean.norm(), atol=1e-5, rtol=1e-4)


def test_t5_matches_direct_model_call(tiny_umt5):
    enc = T5TextEncoder(str(tiny_umt5), max_length=12)
    inputs = enc.tokenizer(
        ["a mug"], padding="max_length", max_length=12, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = enc.model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(enc.encode(["a mug"]).tokens[0, :4], ref[0, :4])


def test_t5_cache_and_determinism(tiny_umt5):
    enc = T5TextEncoder(str(tiny_umt5), max_length=8)
    a = enc.encode(["a mug", "a car"])
    b = enc.encode(["a car", "a mug"])
    assert enc.cache_info().hits == 2 and enc.cache_info().misses == 2
    torch.testing.assert_close(a.tokens[[1, 0]], b.tokens, rtol=0, atol=0)
    other = T5TextEncoder(str(tiny_umt5), max_length=8)
    torch.testing.assert_close(other.encode(["a mug", "a car"]).pooled, a.pooled, rtol=0, atol=1e-6)


def test_t5_config_and_wan_layout(tmp_path):
    from transformers import T5EncoderModel

    enc = load_text_encoder("t5", str(_tiny_t5(tmp_path / "t5", kind="t5")), max_length=6)
    assert type(enc.model) is T5EncoderModel and enc.encode(["hello"]).tokens.shape == (1, 6, 32)
    wan = load_text_encoder("umt5", str(_tiny_t5(tmp_path / "wan", layout="wan")), max_length=6)
    assert wan.encode(["hello"]).tokens.shape == (1, 6, 32)


def test_t5_dtype(tiny_umt5):
    enc = T5TextEncoder(str(tiny_umt5), max_length=6, dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    assert enc.encode(["a mug"]).tokens.dtype == torch.bfloat16


def test_t5_missing_path_is_clear(tmp_path):
    for bad in ("/nonexistent/umt5-xxl", str(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError) as info:
            T5TextEncoder(bad)
        assert "\n" not in str(info.value) and "not found" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no T5 text encoder config.json"):
        T5TextEncoder(str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="cannot load T5 text encoder 'nosuch-org/nosuch-model'"
    ) as info:
        T5TextEncoder("nosuch-org/nosuch-model")
    assert "\n" not in str(info.value) and "allow_download=True" in str(info.value)


def test_t5_rejects_other_model_types(tmp_path):
    from egolcd.text import _minilm_dir

    with pytest.raises(ValueError, match="unsupported text encoder model_type 'bert'"):
        T5TextEncoder(str(_minilm_dir()))


def test_default_length_holds_compiled_example_prompts(caplog):
    from egolcd.narrative import compile_narrative, load_narrative

    n = load_narrative(Path(__file__).resolve().parent.parent / "examples" / "kitchen_revisit.yaml")
    prompts = compile_narrative(n, fps=8, chunk_frames=3).prompts
    enc = MiniLMTextEncoder()
    assert enc.max_length == 128
    with caplog.at_level("WARNING", logger="egolcd.text"):
        emb = enc.encode(prompts)
    assert emb.tokens.shape == (len(prompts), 128, 384)
    assert int(emb.mask.sum(1).max()) < 128 and "keeps the first" not in caplog.text
    # Segments in the same place are closer to each other than to an unrelated prompt.
    sims = emb.pooled @ enc.encode([CAR]).pooled.T
    assert float(emb.pooled[0] @ emb.pooled[4]) > float(sims.max())
