"""Issue 13, item 14: a real two-process CPU training run (gloo), not only parsed accelerate configs.

How two processes are started on CPU: ``accelerate launch --cpu --num_processes 2`` does NOT do it: with
``--cpu`` accelerate uses its "simple" launcher, which starts one process (more only through
``--mpirun_hostfile``). The launch that works on a CPU-only machine is torchrun with accelerate told to use
the CPU (``ACCELERATE_USE_CPU=1``; accelerate then picks ``MULTI_CPU`` and the gloo backend)::

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m egolcd train CONFIG.yaml

FSDP is not tried here: accelerate's FSDP launcher refuses ``--cpu`` together with ``--use_fsdp``
(``launch_command``: ``elif args.use_fsdp and not args.cpu``), and the FSDP config targets GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from egolcd.config import PRESETS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
CLIPS, CHUNKS = 4, 3


def _latent_cache(root: Path) -> Path:
    """A latent cache of CLIPS random tiny-preset clips (the index.json + shard layout prepare-latents writes)."""
    from egolcd.data.latents import LatentClip, LatentGeometry, LatentIndex

    tiny = PRESETS["tiny"]
    k, c = tiny.chunk_frames, int(tiny.transformer["in_channels"])
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors, clips = {}, []
    for i in range(CLIPS):
        key = f"clip{i}"
        tensors[f"{key}.latents"] = torch.randn(c, CHUNKS * k, 4, 4, generator=g)
        tensors[f"{key}.text"] = torch.randn(CHUNKS, 6, 384, generator=g)
        tensors[f"{key}.text_mask"] = torch.arange(6).expand(CHUNKS, 6) < 4
        tensors[f"{key}.pooled"] = torch.nn.functional.normalize(torch.randn(CHUNKS, 384, generator=g), dim=-1)
        tensors[f"{key}.segments"] = torch.arange(CHUNKS)
        clips.append(LatentClip(video_id=key, shard="shard-00000.safetensors", key=key, num_latent_frames=CHUNKS * k))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(root / "shard-00000.safetensors"))
    geometry = LatentGeometry(
        chunk_frames=k, chunks_per_clip=CHUNKS, num_latent_frames=CHUNKS * k, latent_channels=c, latent_height=4,
        latent_width=4, num_frames=(CHUNKS * k - 1) * tiny.vae_temporal + 1, height=16, width=16, fps=8,
        vae_temporal=tiny.vae_temporal, text_dim=384, text_len=6, pooled_dim=384,
    )
    LatentIndex(geometry=geometry, vae={}, text_encoder={}, clips=clips, shards=["shard-00000.safetensors"],
                complete=True, preset="tiny").save(root)
    return root


def _config(path: Path, out: Path, data: Path, **overrides) -> Path:
    config = {
        "output_dir": str(out), "data": str(data), "preset": "tiny",
        "memory": {"window_chunks": 1, "sink": False}, "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0}, "ema": {"enabled": False},
        "batch_size": 1, "grad_accum": 1, "max_steps": 2, "checkpoint_every": 1, "keep_checkpoints": None,
        "log_every": 1, "report_to": "none", "num_workers": 0, "seed": 0,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _latent_cache(tmp_path_factory.mktemp("dist") / "latents")


def test_two_processes_train_resume_and_change_the_process_count(data, tmp_path, egolcd_processes):
    out = tmp_path / "run"
    egolcd_processes(2, "train", str(_config(tmp_path / "a.yaml", out, data)))
    state = json.loads((out / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 2
    assert {p.name for p in (out / "checkpoint-000002").glob("rng-*")} == {"rng-00000.safetensors", "rng-00001.safetensors"}
    # --resume latest from a two-process checkpoint, with two processes
    egolcd_processes(2, "train", str(_config(tmp_path / "b.yaml", out, data, max_steps=3)), "--resume", "latest")
    assert [m["step"] for m in _steps(out)] == [1, 2, 3]
    # the process count changes on resume: documented behaviour is a warning (the RNG streams restart,
    # the data position is mapped onto the new count), then training goes on
    proc = egolcd_processes(1, "train", str(_config(tmp_path / "c.yaml", out, data, max_steps=4)), "--resume", "latest")
    assert "process count changed" in proc.stderr
    assert [m["step"] for m in _steps(out)] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint-000004" / "trainer_state.json").read_text())["num_processes"] == 1


def test_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path, egolcd_processes):
    # the same global batch of 2 clips: 2 processes x batch 1, or 1 process x batch 1 x grad_accum 2. Each
    # micro-batch's noise comes from (seed, step, place in the global batch), not from the process
    # (egolcd/training/trainer.py); LoRA dropout is 0 (dropout draws from each process's own RNG)
    egolcd_processes(2, "train", str(_config(tmp_path / "two.yaml", tmp_path / "two", data)))
    # (the one-process run's grad_accum given on the command line, as the demo recipe does)
    egolcd_processes(1, "train", str(_config(tmp_path / "one.yaml", tmp_path / "one", data)), "--set", "grad_accum=2")
    assert yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["grad_accum"] == 2
    two, one = _steps(tmp_path / "two"), _steps(tmp_path / "one")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    a = load_file(str(tmp_path / "two" / "checkpoint-000002" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoint-000002" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


def test_resume_latest_past_a_truncated_checkpoint_and_a_cut_metrics_log(data, tmp_path, egolcd_processes):
    """Items 3, 4 and 13 as a user meets them: a full disk cut the last metrics line and the latest
    checkpoint's optimizer file; ``--resume latest`` warns, naming the file, and goes on from the previous one."""
    out = tmp_path / "run"
    egolcd_processes(1, "train", str(_config(tmp_path / "a.yaml", out, data)))
    optim = out / "checkpoint-000002" / "optimizer.safetensors"
    optim.write_bytes(optim.read_bytes()[:-64])
    log = out / "logs" / "metrics.jsonl"
    text = log.read_text()
    log.write_text(text[: len(text) - 20])  # ends mid-line
    proc = egolcd_processes(1, "train", str(_config(tmp_path / "b.yaml", out, data, max_steps=3)), "--resume", "latest")
    assert "optimizer.safetensors" in proc.stderr and "checkpoint-000002" in proc.stderr
    assert [m["step"] for m in _steps(out)] == [1, 2, 3]
    # a damaged trainer_state.json of the only checkpoint named: one line, exit 2
    for ckpt in sorted(out.glob("checkpoint-*")):
        (ckpt / "trainer_state.json").write_text('{"step": ')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "egolcd", "train", str(tmp_path / "b.yaml"), "--resume", "latest"],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("egolcd: error")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
