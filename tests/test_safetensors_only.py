"""Issue 13, item 6: every from_pretrained of ours reads safetensors only. A folder holding only pickle
weights (``*.bin``, which can run code when loaded) is refused with one line, never loaded: the transformer
(tests/test_reliability_generate.py), the VAE, the text encoders and the local evaluation models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _tokenizer():
    from transformers import AutoTokenizer

    from egolcd.text import _minilm_dir

    return AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True)


def _to_pickle(directory: Path) -> None:
    """Replace the folder's safetensors weights by a pickle ``.bin`` (transformers 5 writes only safetensors)."""
    from safetensors.torch import load_file

    for weights in directory.glob("*.safetensors"):
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.stem + ".bin"
        torch.save(load_file(str(weights)), directory / name)
        weights.unlink()


def _pickle_only(directory: Path, model) -> Path:
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    _to_pickle(directory)
    assert list(directory.glob("*.bin")) and not list(directory.glob("*.safetensors"))
    return directory


def test_minilm_folder_with_only_a_pickle_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from egolcd.text import MiniLMTextEncoder

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=_tokenizer().vocab_size)
    folder = _pickle_only(tmp_path / "bert", BertModel(config))
    with pytest.raises(FileNotFoundError, match="safetensors only") as info:
        MiniLMTextEncoder(model_dir=folder)
    assert "\n" not in str(info.value)


def test_t5_folder_with_only_a_pickle_is_refused(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    from egolcd.text import T5TextEncoder

    torch.manual_seed(0)
    config = UMT5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=_tokenizer().vocab_size)
    folder = _pickle_only(tmp_path / "umt5", UMT5EncoderModel(config))
    with pytest.raises(FileNotFoundError, match="cannot load T5 text encoder") as info:
        T5TextEncoder(str(folder))
    assert "\n" not in str(info.value)


def test_local_metric_model_with_only_a_pickle_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from egolcd.metrics import _load_local

    folder = tmp_path / "feat"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(folder)
    _to_pickle(folder)
    with pytest.raises(ValueError, match="cannot load features") as info:
        _load_local(BertModel, folder, "features")
    assert "\n" not in str(info.value)


def test_vae_folder_with_only_a_pickle_is_refused(tmp_path):
    from egolcd.config import PRESETS
    from egolcd.vae import VideoVAE, build_vae

    vae = build_vae(PRESETS["tiny"], None)
    vae.model.save_pretrained(tmp_path / "vae")
    _to_pickle(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="safetensors") as info:
        VideoVAE.from_pretrained(tmp_path / "vae")
    assert "\n" not in str(info.value)
