"""Training loop: config validation, learning, exact resume, atomic checkpoints, NaN abort, export."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from egolcd.config import PRESETS
from egolcd.losses import LossWeights, teacher_forcing_loss
from egolcd.memory import MemoryPolicy
from egolcd.training import (
    Trainer,
    TrainingAborted,
    export_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_base_transformer,
    load_train_config,
    train,
    train_config_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = 3  # window 1, no sink: the third chunk reads chunk 0 sparsely from long-term memory (L_MR > 0)
MEMORY = {"window_chunks": 1, "sink": False}


class ClipDataset(torch.utils.data.Dataset):
    """Latent-cache items (``egolcd.data.latents.LatentDataset`` format) with random tiny tensors."""

    def __init__(self, n: int = 5, chunks: int = CHUNKS, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.poison = False
        self.items = [
            {
                "latents": torch.randn(4, chunks * 2, 4, 4, generator=g),
                "text": torch.randn(chunks, 6, 384, generator=g),
                "text_mask": torch.arange(6).expand(chunks, 6) < 4,
                "pooled": torch.nn.functional.normalize(torch.randn(chunks, 384, generator=g), dim=-1),
                "segments": torch.arange(chunks),
                "video_id": f"clip{i}",
            }
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.items[i])
        if self.poison:  # a corrupt clip: the loss becomes NaN
            item["latents"] = torch.full_like(item["latents"], float("nan"))
        return item


def make_cfg(out: Path, **overrides):
    base = {
        "output_dir": str(out),
        "preset": "tiny",
        "memory": dict(MEMORY),
        "lora": {"rank": 4, "alpha": 8.0},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
        "max_steps": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "report_to": "none",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return train_config_from_dict(base)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tree_hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- config


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optimiser": {"lr": 1e-4}}, "unknown key 'optimiser'"),
        ({"optimizer": {"lr_max": 1e-4}}, "unknown key 'optimizer.lr_max'"),
        ({"memory": {"windows": 2}}, "unknown key 'memory.windows'"),
        ({"max_steps": "ten"}, "'max_steps' must be int, got str"),
        ({"max_steps": True}, "'max_steps' must be int, got bool"),
        ({"lora": {"rank": 4.5}}, "'lora.rank' must be int, got float"),
        ({"ema": {"enabled": "yes"}}, "'ema.enabled' must be bool, got str"),
        ({"optimizer": {"betas": [0.9]}}, "'optimizer.betas' must be list of 2 float, got list"),
        ({"memory": {"top_m": "two"}}, "'memory.top_m' must be int, got str"),
        ({"lora": {"target_modules": "attn1.to_q"}}, "'lora.target_modules' must be list of str, got str"),
        ({"mixed_precision": "fp32"}, "'mixed_precision' must be one of no, bf16, fp16"),
        ({"memory": {"policy": "everything"}}, "memory: unknown memory policy 'everything'"),
        ({"loss": {"variant": "mse"}}, "'loss.variant' must be one of mr, anchor, none"),
        ({"preset": "huge"}, "'preset' must be one of"),
        ({}, "missing required key 'output_dir'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, data, message):
    if data:
        data = {"output_dir": str(tmp_path / "run"), **data}
    with pytest.raises(ValueError) as err:
        load_train_config(write_yaml(tmp_path, data))
    text = str(err.value)
    assert text.startswith("train config: ") and message in text and "\n" not in text


def test_config_values_and_preset_memory(tmp_path):
    cfg = load_train_config(
        write_yaml(
            tmp_path,
            {
                "output_dir": "run",
                "optimizer": {"lr": "1e-4", "grad_clip": None},
                "memory": {"top_m": 1},
            },
        )
    )
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.grad_clip is None  # YAML 1.1 "1e-4" is a string
    assert cfg.memory.top_m == 1 and cfg.memory.max_entries == PRESETS["tiny"].memory.max_entries
    assert cfg.optimizer.betas == (0.9, 0.999)


def test_shipped_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert {p.name for p in configs} >= {"tiny.yaml", "wan2.1-1.3b-lora.yaml"}
    for path in configs:
        load_train_config(path)
    wan = load_train_config(ROOT / "configs" / "train" / "wan2.1-1.3b-lora.yaml")
    assert (wan.lora.rank, wan.mixed_precision, wan.gradient_checkpointing) == (64, "bf16", True)
    kinds = {}
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        kinds[path.stem] = str(load_config_from_file(str(path)).distributed_type)
    assert set(kinds) == {"single_gpu", "multi_gpu_ddp", "fsdp", "multi_node"}
    assert "FSDP" in kinds["fsdp"] and "MULTI_GPU" in kinds["multi_node"]


# --------------------------------------------------------------------------- learning


def fixed_loss(model, clip: dict, seed: int = 123, draws: int = 4) -> float:
    """Mean clip loss over fixed noise draws (the same for every model)."""
    policy = MemoryPolicy(make_cfg(Path("unused")).memory, 2)
    g = torch.Generator().manual_seed(seed)
    x0 = clip["latents"][None]
    text = [clip["text"][None, i] * clip["text_mask"][None, i, :, None] for i in range(CHUNKS)]
    pooled = [clip["pooled"][None, i] for i in range(CHUNKS)]
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            t = torch.rand(1, CHUNKS, generator=g).clamp(0.05, 0.95)
            eps = torch.randn(x0.shape, generator=g)
            total += float(
                teacher_forcing_loss(
                    model.eval(), policy, x0, eps, t, text, pooled, weights=LossWeights()
                ).loss
            )
    return total / draws


@pytest.mark.parametrize("lora", [True, False])
def test_steps_on_a_fixed_batch_reduce_the_loss(tmp_path, lora):
    data = ClipDataset(n=1)
    lr = 3e-2 if lora else 3e-3
    cfg = make_cfg(
        tmp_path / "run",
        lora={"enabled": lora},
        optimizer={"lr": lr},
        max_steps=40,
        checkpoint_every=40,
        scheduler={"warmup_steps": 2},
    )
    result = train(cfg, data)
    base = load_base_transformer(tmp_path / "run" / "init_model", PRESETS["tiny"])
    before, after = fixed_loss(base, data.items[0]), fixed_loss(result.model, data.items[0])
    assert after < 0.85 * before, (before, after)
    n_trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert (n_trainable < 5000) == lora
    assert all(h["memory"] > 0 for h in result.history)  # the memory term is active


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    runs = [
        train(make_cfg(tmp_path / f"gc{gc}", gradient_checkpointing=gc, max_steps=2), ClipDataset())
        for gc in (False, True)
    ]
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    for (n, a), (_, b) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters()):
        assert torch.equal(a, b), n


# --------------------------------------------------------------------------- resume and checkpoints


class Kill(Exception):
    pass


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    # LoRA dropout (global RNG), EMA, 2 micro-batches of 2 over 5 clips (epochs roll over mid-step)
    kw = dict(
        lora={"dropout": 0.1},
        ema={"enabled": True, "decay": 0.9},
        batch_size=2,
        grad_accum=2,
        max_steps=6,
        checkpoint_every=3,
        keep_checkpoints=None,
        scheduler={"warmup_steps": 2},
    )
    full = train(make_cfg(tmp_path / "full", **kw), ClipDataset())

    def kill_at_3(step, metrics):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        train(make_cfg(tmp_path / "cut", **kw), ClipDataset(), callback=kill_at_3)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-000003"]
    # a fresh start into a folder with checkpoints is refused
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(make_cfg(tmp_path / "cut", **kw), ClipDataset())
    # an unfinished (crashed) save looks complete but for its name: resume="latest" ignores it
    junk = tmp_path / "cut" / "checkpoint-000099.tmp"
    junk.mkdir()
    (junk / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-000003"
    resumed = train(make_cfg(tmp_path / "cut", **kw), ClipDataset(), resume="latest")
    assert not junk.exists()

    assert [h["loss"] for h in full.history[3:]] == [h["loss"] for h in resumed.history]
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == [4, 5, 6]
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoint-000006" / name))
        b = load_file(str(tmp_path / "cut" / "checkpoint-000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    # the step log of the cut run, after resume, matches too
    lines = (tmp_path / "cut" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [yaml.safe_load(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]

    # resume from an explicit checkpoint path, past the original end (extends the run)
    more = train(
        make_cfg(tmp_path / "cut", **{**kw, "max_steps": 7}),
        ClipDataset(),
        resume=tmp_path / "cut" / "checkpoint-000006",
    )
    assert [h["step"] for h in more.history] == [7]


def test_failed_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    import egolcd.training.checkpoint as train_mod

    calls = {"n": 0}
    real = train_mod.optimizer_to_tensors

    def flaky(state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(state)

    monkeypatch.setattr(train_mod, "optimizer_to_tensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(make_cfg(tmp_path / "run", checkpoint_every=1), ClipDataset())
    names = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-000001", "checkpoint-000002.tmp"]
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000001"


def test_keep_checkpoints(tmp_path):
    train(make_cfg(tmp_path / "run", checkpoint_every=1, keep_checkpoints=2), ClipDataset())
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-000003", "checkpoint-000004"]
    ckpt = tmp_path / "run" / "checkpoint-000004"
    assert {p.name for p in ckpt.iterdir()} == {
        "trainer_state.json",
        "config.yaml",
        "trainable.safetensors",
        "lora",
        "optimizer.safetensors",
        "scheduler.json",
        "rng-00000.safetensors",
    }
    assert not list(ckpt.rglob("*.bin")) and not list(ckpt.rglob("*.pt"))  # no pickle anywhere


def test_non_finite_losses_are_skipped_then_abort_keeps_last_good_checkpoint(tmp_path):
    data = ClipDataset()
    seen: dict = {}

    def weights():
        return {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}

    def hook(step, metrics):
        if step == 2:
            data.poison = True  # one bad step: skipped, training goes on
            seen["w2"] = weights()
        elif step == 3:
            assert metrics["skipped"] and metrics["loss"] != metrics["loss"]
            assert all(torch.equal(seen["w2"][n], w) for n, w in weights().items())  # no update
            data.poison = False
        elif step == 4:
            assert not metrics["skipped"]
            seen["hashes"] = tree_hashes(tmp_path / "run" / "checkpoint-000004")
            data.poison = True  # now for good: abort after 3 in a row

    cfg = make_cfg(tmp_path / "run", max_steps=10, checkpoint_every=2, max_bad_steps=3)
    trainer = Trainer(cfg, data, callback=hook)
    with pytest.raises(TrainingAborted, match=r"3 non-finite losses in a row \(steps 5-7.*checkpoint-000004"):
        trainer.run()
    ckpts = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert ckpts == ["checkpoint-000002", "checkpoint-000004"]  # step 6 was due, but bad: not written
    assert tree_hashes(tmp_path / "run" / "checkpoint-000004") == seen["hashes"]
    lines = [
        yaml.safe_load(x) for x in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [x["skipped"] for x in lines] == [False, False, True, False, True, True, True]
    assert lines[2]["loss"] is None


# --------------------------------------------------------------------------- export


def chunk_output(model, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    text = torch.randn(1, 6, 384, generator=g)
    with torch.no_grad():
        return model.eval().forward_chunk(x, torch.full((1, 2), 400.0), text).sample


def test_export_loads_in_the_pipeline_with_the_trained_outputs(tmp_path):
    from egolcd.pipeline import EgoLCDPipeline

    cfg = make_cfg(tmp_path / "run", max_steps=3, checkpoint_every=3, ema={"enabled": True, "decay": 0.5})
    result = train(cfg, ClipDataset())
    ckpt = result.last_checkpoint
    trained = chunk_output(result.model)
    assert not torch.equal(
        trained, chunk_output(load_base_transformer(tmp_path / "run" / "init_model", PRESETS["tiny"]))
    )

    adapter = export_checkpoint(ckpt, tmp_path / "adapter", use_ema=False)
    assert (adapter / "transformer" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = EgoLCDPipeline.from_pretrained(adapter)
    assert torch.equal(chunk_output(pipe.transformer), trained)
    assert pipe.config.memory.window_chunks == 1 and pipe.config.memory.sink is False  # the training policy

    merged = export_checkpoint(tmp_path / "run", tmp_path / "merged", merge=True, use_ema=False)  # latest
    assert not (merged / "transformer" / "lora").exists()
    merged_model = EgoLCDPipeline.from_pretrained(merged).transformer
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(chunk_output(merged_model), trained, rtol=1e-5, atol=1e-5)

    # EMA weights by default
    ema_out = export_checkpoint(ckpt, tmp_path / "ema")
    ema = load_file(str(ckpt / "ema.safetensors"))
    params = dict(result.model.named_parameters())
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    assert torch.equal(
        chunk_output(EgoLCDPipeline.from_pretrained(ema_out).transformer), chunk_output(result.model)
    )

    with pytest.raises(FileExistsError):
        export_checkpoint(ckpt, tmp_path / "ema")


def test_export_full_finetune(tmp_path):
    from egolcd.pipeline import EgoLCDPipeline

    result = train(
        make_cfg(tmp_path / "run", lora={"enabled": False}, optimizer={"lr": 1e-3}, max_steps=2),
        ClipDataset(),
    )
    out = export_checkpoint(result.last_checkpoint, tmp_path / "model", memory_guidance=2.0)
    assert not (out / "transformer" / "lora").exists()
    pipe = EgoLCDPipeline.from_pretrained(out)
    assert torch.equal(chunk_output(pipe.transformer), chunk_output(result.model))
    assert pipe.config.memory_guidance == 2.0  # the default the model ships with


# --------------------------------------------------------------------------- samples, signals, data


def test_periodic_samples_do_not_change_training(tmp_path):
    narrative = tmp_path / "n.txt"
    narrative.write_text("1 | opens the fridge\n")
    kw = dict(lora={"dropout": 0.1}, max_steps=2, checkpoint_every=2)
    plain = train(make_cfg(tmp_path / "plain", **kw), ClipDataset())
    sampled = train(
        make_cfg(tmp_path / "sampled", sample_every=1, sample_narrative=str(narrative), sample_steps=1, **kw),
        ClipDataset(),
    )
    assert sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir()) == [
        "step-000001.mp4",
        "step-000002.mp4",
    ]
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in sampled.history]
    for (n, a), (_, b) in zip(plain.model.named_parameters(), sampled.model.named_parameters()):
        assert torch.equal(a, b), n


def test_sigint_finishes_the_step_saves_and_stops(tmp_path):
    import os
    import signal

    def interrupt(step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(
        make_cfg(tmp_path / "run", max_steps=10, checkpoint_every=10), ClipDataset(), callback=interrupt
    )
    assert result.interrupted and result.step == 2
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-000002"]


def test_missing_data_and_bad_resume_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="'data' is required"):
        train(make_cfg(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="latent cache not found"):
        train(make_cfg(tmp_path / "run", data=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        train(make_cfg(tmp_path / "run"), ClipDataset(), resume=tmp_path / "nowhere")


def test_starts_from_a_wan_diffusers_folder_and_exports(tmp_path):
    from diffusers import WanTransformer3DModel

    from egolcd.pipeline import EgoLCDPipeline
    from egolcd.vae import build_vae

    wan = tmp_path / "wan"  # Wan2.1 diffusers layout: no egolcd_config.json, no chunk_frames
    config = {k: v for k, v in PRESETS["tiny"].transformer.items() if k != "chunk_frames"}
    torch.manual_seed(0)
    WanTransformer3DModel(**config).save_pretrained(wan / "transformer")
    build_vae(PRESETS["tiny"], None).save_pretrained(wan / "vae")
    result = train(make_cfg(tmp_path / "run", init_model=str(wan), max_steps=2), ClipDataset())
    assert result.model.config.chunk_frames == PRESETS["tiny"].chunk_frames
    assert not (tmp_path / "run" / "init_model").exists()
    out = export_checkpoint(tmp_path / "run", tmp_path / "model", use_ema=False)
    pipe = EgoLCDPipeline.from_pretrained(out)
    assert torch.equal(chunk_output(pipe.transformer), chunk_output(result.model))
    assert pipe.config.preset == "tiny"


def test_qk_norm_weights_train_at_their_own_rate(tmp_path: Path) -> None:
    """``optimizer.qk_norm_lr_scale``: the self-attention q/k RMSNorm weights (the attention temperature)
    form their own AdamW group at lr * scale; everything else keeps lr, and the scale is validated."""
    cfg = make_cfg(tmp_path / "run", lora={"enabled": False}, optimizer={"lr": 1e-3, "qk_norm_lr_scale": 20.0})
    trainer = Trainer(cfg, ClipDataset())
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    assert groups[0]["initial_lr"] == pytest.approx(1e-3) and groups[1]["initial_lr"] == pytest.approx(2e-2)
    qk = {id(p) for n, p in trainer.transformer.named_parameters() if ".attn1.norm_q." in n or ".attn1.norm_k." in n}
    assert qk and {id(p) for p in groups[1]["params"]} == qk
    assert not qk & {id(p) for p in groups[0]["params"]}
    with pytest.raises(ValueError, match="qk_norm_lr_scale"):
        make_cfg(tmp_path / "x", optimizer={"qk_norm_lr_scale": 0.0})
