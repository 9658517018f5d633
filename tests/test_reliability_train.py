"""Issue 13, items 3, 4, 13: a truncated latest checkpoint is skipped for the newest readable one, a cut
metrics log is repaired, a damaged JSON file is named (unit level: no training run)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from egolcd.training import CHECKPOINT_FORMAT, Trainer, checkpoint_problem
from egolcd.training.checkpoint import _trim_metrics_log, read_json


def _fake_checkpoint(root, step):
    ckpt = root / f"checkpoint-{step:06d}"
    ckpt.mkdir(parents=True)
    for name in ("trainable", "optimizer", "ema", "rng-00000"):
        save_file({"w": torch.randn(64)}, str(ckpt / f"{name}.safetensors"))
    (ckpt / "scheduler.json").write_text("{}")
    (ckpt / "config.yaml").write_text("preset: tiny\n")
    (ckpt / "trainer_state.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "step": step}))
    return ckpt


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "ema.safetensors"])
def test_resume_latest_skips_a_truncated_checkpoint(tmp_path, caplog, name):
    good = _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 4)
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) - 100])
    assert checkpoint_problem(good) is None and name in checkpoint_problem(bad)
    with caplog.at_level(logging.WARNING):
        found = Trainer._resolve_resume(SimpleNamespace(out=tmp_path), "latest")
    assert found == good
    assert name in caplog.text and "checkpoint-000004" in caplog.text


def test_damaged_json_names_its_file(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 2)
    (ckpt / "scheduler.json").write_text('{"last_epoch": ')
    assert "scheduler.json" in checkpoint_problem(ckpt)
    with pytest.raises(ValueError, match="scheduler.json"):
        read_json(ckpt / "scheduler.json")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        Trainer._resolve_resume(SimpleNamespace(out=tmp_path), "latest")
    with pytest.raises(ValueError, match="scheduler.json"):
        Trainer._resolve_resume(SimpleNamespace(out=tmp_path), str(ckpt))


def test_cut_metrics_log_is_repaired(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 1.0}) for i in range(1, 6)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "loss": 0.')  # a full disk cut the last line
    with caplog.at_level(logging.WARNING):
        _trim_metrics_log(log, 4)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert "metrics.jsonl line 6" in caplog.text
