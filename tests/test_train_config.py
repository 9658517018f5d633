"""The training config's validation (pydantic) keeps the one-line messages of the hand-written checker."""

from __future__ import annotations

import pytest
import yaml

from egolcd.training import load_train_config


@pytest.mark.parametrize(
    "text, message",
    [
        ("mixed_precision: no\n", "'mixed_precision' must be str, got bool (quote the value, e.g. \"no\")"),
        ("optimiser: {lr: 1.0e-4}\n", "unknown key 'optimiser' (did you mean 'optimizer'?)"),
        ("memory: {windows: 2}\n", "unknown key 'memory.windows' (did you mean 'memory.window_chunks'?)"),
        ("lora: {target_modules: [attn1.to_q, 3]}\n", "'lora.target_modules[1]' must be str, got int"),
        ("optimizer: {betas: [0.9, 0.9, 0.9]}\n", "'optimizer.betas' must be list of 2 float, got list"),
        ("loss: null\n", "'loss' must be mapping, got null"),
        ("keep_checkpoints: x\n", "'keep_checkpoints' must be int or null, got str"),
        ("loss: {scored_chunks: 0}\n", "'loss.scored_chunks' must be >= 1 or null, got 0"),
    ],
)
def test_yaml_errors_are_one_line_with_the_key_path(tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text("output_dir: run\n" + text)
    with pytest.raises(ValueError) as err:
        load_train_config(path)
    assert str(err.value) == f"train config: {message}"


def test_yaml_1_1_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-4`` as a string; every float key (memory's too) takes it as the number."""
    path = tmp_path / "train.yaml"
    path.write_text(
        "output_dir: run\noptimizer: {lr: 1e-4, betas: [9e-1, 0.99]}\nmemory: {keep_ratio: 5e-1}\n"
        "loss: {memory_weight: 2e-1}\n"
    )
    assert yaml.safe_load(path.read_text())["optimizer"]["lr"] == "1e-4"
    cfg = load_train_config(path)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.memory.keep_ratio == 0.5 and cfg.loss.memory_weight == 0.2
    assert type(cfg.max_steps) is int and type(cfg.lora.alpha) is float


def test_set_overrides_reach_nested_keys_and_are_validated(tmp_path):
    """``egolcd train C.yaml --set KEY=VALUE``: values read as YAML, dotted keys into mappings, the same one-line
    errors as the file's own keys; the file itself is not changed."""
    path = tmp_path / "train.yaml"
    path.write_text("output_dir: run\ngrad_accum: 4\noptimizer: {lr: 1.0e-3}\n")
    cfg = load_train_config(path, ["grad_accum=2", "optimizer.lr=5e-4", "ema.enabled=false", "memory.top_m=2"])
    assert (cfg.grad_accum, cfg.optimizer.lr, cfg.ema.enabled, cfg.memory.top_m) == (2, 5e-4, False, 2)
    assert load_train_config(path).grad_accum == 4
    for bad, message in [
        ("grad_acum=2", "unknown key 'grad_acum' (did you mean 'grad_accum'?)"),
        ("grad_accum", "--set takes KEY=VALUE (dotted keys for nested settings), got 'grad_accum'"),
        ("grad_accum.x=1", "--set grad_accum.x: grad_accum is not a mapping"),
        ("grad_accum=two", "'grad_accum' must be int, got str"),
    ]:
        with pytest.raises(ValueError) as err:
            load_train_config(path, [bad])
        assert str(err.value) == f"train config: {message}", bad
