"""EgoVid-5M-format dataset and latent cache: scanning, skipping, items, prompts, shards, resume (CPU)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from egolcd.config import PRESETS
from egolcd.data import (
    EgoVidConfig,
    EgoVidDataset,
    LatentDataset,
    LatentIndex,
    build_from_preset,
    caption_narrative,
    caption_prompts,
    collate_latents,
    collate_videos,
    prepare_latents,
    split_sentences,
)
from egolcd.narrative import build_prompts
from egolcd.text import load_text_encoder
from egolcd.vae import build_vae
from egolcd.video_io import VideoReadError, VideoWriter

COLUMNS = ["video_id", "frame_num", "fps", "llava_cap", "name", "noun_cls", "verb_cls"]
CAPTIONS = {
    "P01_0_16": "A kitchen with a white sink and a red kettle. The person rinses a blue mug. "
    "The person puts the mug on the rack.",
    "P02_8_40": "A workshop bench with tools. The person picks up a hammer.",
    "P03_0_32": "The person opens the fridge.",
    "P04_0_20": "A desk with a laptop. The person types. The person closes the lid. The person stands up.",
    "bad_0_10": "A corrupt clip.",
    "gone_0_10": "A missing clip.",
    "short_0_5": "A short clip.",
}
GOOD = ["P01_0_16", "P02_8_40", "P03_0_32", "P04_0_20"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def _shapes(t: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Moving coloured squares over a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((t, h, w, 3), np.uint8)
    colour = rng.integers(80, 255, size=3)
    for i in range(t):
        out[i, ..., 0] = 30 + 100 * x / w
        out[i, ..., 1] = 30 + 100 * y / h
        out[i, ..., 2] = 90
        out[i, 10 : 10 + 16, 2 * i % (w - 16) : 2 * i % (w - 16) + 16] = colour
    return out


def _grey(t: int) -> np.ndarray:
    """Frame i is uniform grey 20 + 6 i (its index can be read back after lossy coding)."""
    return np.stack([np.full((64, 64, 3), 20 + 6 * i, np.uint8) for i in range(t)])


def _write(path: Path, frames: np.ndarray, fps: int) -> None:
    with VideoWriter(path, fps=fps, width=frames.shape[2], height=frames.shape[1]) as w:
        w.write(frames)


def _write_csv(path: Path, ids: list[str], columns: list[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for vid in ids:
            row = dict(video_id=vid, frame_num=16, fps=8, llava_cap=CAPTIONS[vid], name="#C C does it")
            row.update(noun_cls="mug", verb_cls="rinse")
            writer.writerow({k: v for k, v in row.items() if k in columns})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("egovid")
    videos = root / "videos"
    videos.mkdir()
    _write(videos / "P01_0_16.mp4", _shapes(16, seed=1), fps=8)  # one file per clip
    _write(videos / "P02.mp4", _grey(40), fps=16)  # a long video, cut at frames 8..40 by the id
    _write(videos / "P03_0_32.mp4", _shapes(32, h=64, w=96, seed=3), fps=16)  # wider: resize + crop
    _write(videos / "P04_0_20.mp4", _shapes(20, seed=4), fps=8)
    _write(videos / "short_0_5.mp4", _shapes(5), fps=8)  # too short for 13 frames
    (videos / "bad_0_10.mp4").write_bytes(np.random.default_rng(0).bytes(3000))  # corrupt
    (root / "P03_0_32").mkdir()  # poses of P03, one row per source frame
    np.save(root / "P03_0_32" / "fused_pose.npy", np.arange(32, dtype=np.float32)[:, None].repeat(7, 1))
    _write_csv(root / "metadata.csv", list(CAPTIONS))
    return root


def _config(root: Path, **kw) -> EgoVidConfig:
    return build_from_preset("tiny", root, chunks_per_clip=2, **kw)


@pytest.fixture(scope="module")
def dataset(root: Path) -> EgoVidDataset:
    return EgoVidDataset(_config(root))


@pytest.fixture(scope="module")
def vae():
    return build_vae(PRESETS["tiny"], None)


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder("minilm")


# ------------------------------------------------------------------------------------------ dataset
def test_config_from_preset(root: Path) -> None:
    cfg = _config(root)
    assert (cfg.chunk_frames, cfg.height, cfg.width, cfg.fps) == (2, 64, 64, 8)
    assert cfg.num_frames == 13 and cfg.num_latent_frames == 4 and cfg.min_frames == 13
    assert cfg.csv == root / "metadata.csv" and cfg.video_dir == root / "videos"
    assert build_from_preset("tiny", root, num_frames=29).chunks_per_clip == 4
    with pytest.raises(ValueError, match="num_frames"):
        build_from_preset("tiny", root, num_frames=17)  # 5 latent frames: not whole chunks of 2


def test_scan_skips_counts_and_logs_once(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="egolcd.data"):
        ds = EgoVidDataset(_config(root, probe_workers=2))
        for i in range(len(ds)):
            ds[i]
    assert ds.video_ids == GOOD
    assert ds.skipped == {"corrupt": 1, "missing": 1, "too_short": 1}
    for vid, reason in (("bad_0_10", "corrupt"), ("gone_0_10", "missing"), ("short_0_5", "too short")):
        hits = [r.getMessage() for r in caplog.records if vid in r.getMessage()]
        assert len(hits) == 1 and reason in hits[0], hits
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped 3 of 7")]
    assert len(summary) == 1 and "1 corrupt" in summary[0]


def test_item_shapes_and_prompts(dataset: EgoVidDataset) -> None:
    item = dataset[0]
    assert item["video"].shape == (3, 13, 64, 64) and item["video"].dtype == torch.float32
    assert -1.0 <= item["video"].min() and item["video"].max() <= 1.0
    assert item["video_id"] == "P01_0_16" and item["caption"] == CAPTIONS["P01_0_16"]
    assert item["segments"].tolist() == [0, 1] and item["segments"].dtype == torch.long
    p0, p1 = item["prompts"]
    assert p0 == (
        "Step 1 of 2. The video begins with a view of a kitchen with a white sink and a red kettle. "
        "The camera wearer rinses a blue mug. The video wraps up with a view of a kitchen with a white sink "
        "and a red kettle, right after the camera wearer rinses a blue mug."
    )
    assert p1.startswith("Step 2 of 2. The video begins with a view of a kitchen with a white sink and a red")
    assert "The camera wearer puts the mug on the rack." in p1 and "pose" not in item
    # the exact inference template: build_prompts of the caption's narrative
    narrative, chunks = caption_narrative(CAPTIONS["P01_0_16"], 2)
    assert [build_prompts(narrative)[j] for j in chunks] == item["prompts"]
    # one sentence: one segment for every chunk
    single = dataset[2]
    assert single["segments"].tolist() == [0, 0]
    assert single["prompts"][0].startswith("Step 1 of 1. The video begins with a view of the surroundings.")
    assert single["video"].shape == (3, 13, 64, 64)  # 96x64 source: resized and centre-cropped


def test_cut_from_long_video_and_resampling(dataset: EgoVidDataset) -> None:
    item = dataset[1]  # P02_8_40: source frames 8..39 at 16 fps -> 8 fps: source 8, 10, 12, ...
    grey = (item["video"].mean(dim=(0, 2, 3)) + 1) * 127.5
    expected = torch.tensor([20 + 6 * (8 + 2 * k) for k in range(13)], dtype=torch.float32)
    assert torch.allclose(grey, expected, atol=2.5), (grey, expected)


def test_pose_follows_the_sampled_frames(dataset: EgoVidDataset) -> None:
    item = dataset[2]  # P03: 16 fps source, 8 fps clip -> source frames 0, 2, 4, ...
    assert item["pose"].shape == (13, 7)
    assert item["pose"][:, 0].tolist() == [2.0 * k for k in range(13)]
    batch = collate_videos([dataset[0], item])
    assert batch["video"].shape == (2, 3, 13, 64, 64) and batch["segments"].shape == (2, 2)
    assert batch["pose"][0] is None and batch["pose"][1].shape == (13, 7)


def test_captions_to_segments() -> None:
    assert split_sentences("One. Two!  Three? four") == ["One.", "Two!", "Three?", "four"]
    prompts, segments = caption_prompts("A hall. The person walks. She sits. He reads.", 4)
    assert segments == [0, 1, 2, 2] and prompts[2] == prompts[3]
    assert prompts[0].startswith(
        "Step 1 of 3. The video begins with a view of a hall. The camera wearer walks."
    )
    narrative, segments = caption_narrative("The video shows a room. S2. S3. S4. S5.", 2)
    assert segments == [0, 1] and narrative.scene == "a room"
    assert [s.action for s in narrative.segments] == ["S2, then S3", "S4, then S5"]
    narrative, _ = caption_narrative("", 2, name="#C C opens the fridge")
    assert narrative.segments[0].action == "opens the fridge" and narrative.scene == ""
    with pytest.raises(ValueError, match="empty caption"):
        caption_narrative(" ", 2)


def test_no_usable_clips_and_malformed_csv(root: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    _write_csv(csv_path, ["bad_0_10", "gone_0_10", "short_0_5"])
    with pytest.raises(ValueError) as err:
        EgoVidDataset(_config(root, csv=csv_path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no usable clips in {root / 'videos'}:")
    for part in ("1 corrupt", "1 missing", "1 too short"):
        assert part in msg
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,text\nP01_0_16,hello\n")
    with pytest.raises(ValueError, match=r"malformed captions CSV .*'video_id'.*found: id, text") as err:
        EgoVidDataset(_config(root, csv=wrong))
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="captions CSV not found"):
        EgoVidDataset(_config(root, csv=tmp_path / "nope.csv"))


def test_any_folder_with_path_and_caption(root: Path, tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    _write(tmp_path / "clips" / "walk.mp4", _shapes(13, seed=9), fps=8)
    (tmp_path / "captions.csv").write_text(
        "path,caption\nclips/walk.mp4,A hallway. The person walks.\nclips/walk.mp4,again\nclips/x.mp4,\n"
    )
    ds = EgoVidDataset(EgoVidConfig(root=tmp_path, csv=tmp_path / "captions.csv", chunks_per_clip=2))
    assert ds.skipped == {"duplicate": 1, "no_caption": 1} and len(ds) == 1
    item = ds[0]
    assert item["video_id"] == "walk" and item["video"].shape == (3, 13, 64, 64)
    assert item["prompts"][0].startswith("Step 1 of 1. The video begins with a view of a hallway.")


# ------------------------------------------------------------------------------------------ latents
def _read_all(directory: Path) -> list[dict]:
    return [LatentDataset(directory)[i] for i in range(len(LatentDataset(directory)))]


def test_prepare_latents_round_trip(dataset, vae, text_encoder, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    index = prepare_latents(dataset, vae, text_encoder, out, shard_size=3, progress=False, preset="tiny")
    assert index.complete and [c.video_id for c in index.clips] == GOOD
    assert index.shards == ["shard-00000.safetensors", "shard-00001.safetensors"]  # 3 + a flushed 1
    assert index.skipped == {"corrupt": 1, "missing": 1, "too_short": 1}
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["format"] == "egolcd-latents" and on_disk["version"] == 1
    g = on_disk["geometry"]
    assert (g["chunk_frames"], g["latent_channels"], g["latent_height"], g["text_dim"]) == (2, 4, 8, 384)
    assert on_disk["clips"][3] == dict(
        video_id="P04_0_20", shard="shard-00001.safetensors", key="3", num_latent_frames=4
    )
    ds = LatentDataset(out)
    assert len(ds) == 4
    for i in range(len(ds)):
        got, item = ds[i], dataset[i]
        want = vae.encode(item["video"][None])[0]
        assert got["latents"].shape == (4, 4, 8, 8) and got["latents"].dtype == torch.float32
        assert torch.allclose(got["latents"], want, atol=1e-5)
        emb = text_encoder.encode(item["prompts"])
        assert got["text"].shape == (2, text_encoder.max_length, 384)
        assert torch.equal(got["text"], emb.tokens) and torch.equal(got["text_mask"], emb.mask)
        assert torch.equal(got["pooled"], emb.pooled) and got["text_mask"].dtype == torch.bool
        assert torch.equal(got["segments"], item["segments"]) and got["video_id"] == item["video_id"]
    assert ds[2]["pose"].shape == (13, 7)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_latents)))
    assert batch["latents"].shape == (2, 4, 4, 8, 8) and batch["text"].shape[:2] == (2, 2)
    assert batch["pooled"].shape == (2, 2, 384) and batch["video_id"] == GOOD[:2]
    assert "pose" not in batch  # only P03 has a pose


class _Killed(Exception):
    pass


def test_prepare_latents_resumes_after_a_kill(dataset, vae, text_encoder, tmp_path: Path) -> None:
    once = prepare_latents(dataset, vae, text_encoder, tmp_path / "once", shard_size=2, progress=False)
    assert len(once.shards) == 2

    def kill(index: LatentIndex) -> None:
        raise _Killed  # as if the process died right after the first shard

    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        prepare_latents(dataset, vae, text_encoder, out, shard_size=2, progress=False, on_shard=kill)
    partial = LatentIndex.load(out)
    assert not partial.complete and [c.video_id for c in partial.clips] == GOOD[:2]
    resumed = prepare_latents(dataset, vae, text_encoder, out, shard_size=2, progress=False)
    assert resumed.to_dict() == once.to_dict()
    assert (out / "index.json").read_text() == (tmp_path / "once" / "index.json").read_text()
    for a, b in zip(_read_all(out), _read_all(tmp_path / "once")):
        for name in ("latents", "text", "text_mask", "pooled", "segments"):
            assert torch.equal(a[name], b[name])
    # a stop requested by the callback also leaves a resumable cache
    stop = tmp_path / "stopped"
    first = prepare_latents(
        dataset, vae, text_encoder, stop, shard_size=2, progress=False, on_shard=lambda index: False
    )
    assert not first.complete and len(first.clips) == 2
    again = prepare_latents(dataset, vae, text_encoder, stop, shard_size=2, progress=False)
    assert again.to_dict() == once.to_dict()
    # nothing left: a third run changes nothing
    assert prepare_latents(dataset, vae, text_encoder, stop, shard_size=2, progress=False) == again


def test_decode_failure_is_skipped_and_counted(root, vae, text_encoder, tmp_path, monkeypatch) -> None:
    ds = EgoVidDataset(_config(root))
    real = ds._frames

    def flaky(clip):
        if clip.video_id == "P02_8_40":
            raise VideoReadError("cannot read video P02.mp4: broken packet")
        return real(clip)

    monkeypatch.setattr(ds, "_frames", flaky)
    index = prepare_latents(ds, vae, text_encoder, tmp_path / "c", shard_size=8, progress=False)
    assert [c.video_id for c in index.clips] == ["P01_0_16", "P03_0_32", "P04_0_20"]
    assert index.failed == {"P02_8_40": "corrupt"} and index.skipped["corrupt"] == 2
    assert [c.key for c in index.clips] == ["0", "1", "2"]


def test_latent_cache_errors(dataset, vae, text_encoder, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no latent index"):
        LatentDataset(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "index.json").write_text('{"format": "egolcd-latents", "version": 1, "geo')
    with pytest.raises(ValueError, match="corrupt latent index") as err:
        LatentDataset(tmp_path / "corrupt")
    assert "\n" not in str(err.value)
    # a cache made for another geometry is not resumed into
    out = tmp_path / "cache"
    prepare_latents(dataset, vae, text_encoder, out, shard_size=8, progress=False)
    other = EgoVidDataset(build_from_preset("tiny", dataset.config.root, chunks_per_clip=1))
    with pytest.raises(ValueError, match="another geometry"):
        prepare_latents(other, vae, text_encoder, out, progress=False)
