"""The whole training chain through the command line, as a user runs it:
EgoVid-format clips (one corrupt) -> prepare-latents -> train -> resume -> export -> generate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from egolcd.cli import main
from egolcd.video_io import VideoWriter, probe_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egovid")
    (root / "videos").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        vid = f"vid{i}_0_20"
        colour = rng.integers(40, 215, 3).astype(np.uint8)
        with VideoWriter(root / "videos" / f"{vid}.mp4", fps=8, width=64, height=64) as w:
            for t in range(20):
                img = np.full((64, 64, 3), colour, np.uint8)
                img[10 + t : 26 + t, 20:40] = 255 - colour  # an object moving down
                w.write(img[None])
        rows.append(dict(video_id=vid, frame_num=20, fps=8, llava_cap=f"A desk with a mug. The hand moves the mug {i}.",
                         name="move mug", noun_cls="mug", verb_cls="move"))
    (root / "videos" / "broken_0_20.mp4").write_bytes(b"\x00not a video" * 100)
    rows.append(dict(video_id="broken_0_20", frame_num=20, fps=8, llava_cap="Broken.", name="x", noun_cls="x",
                     verb_cls="x"))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_prepare_train_resume_export_generate(dataset, tmp_path, capsys):
    latents = tmp_path / "latents"
    assert main(["prepare-latents", str(dataset), "--out", str(latents), "--preset", "tiny",
                 "--chunks-per-clip", "2", "-q"]) == 0
    index = json.loads((latents / "index.json").read_text())
    assert len(index["clips"]) == 3 and sum(index["skipped"].values()) == 1  # the corrupt clip, counted

    config = yaml.safe_load(open("configs/train/tiny.yaml"))
    config.update(output_dir=str(tmp_path / "run"), data=str(latents), max_steps=4, checkpoint_every=2,
                  batch_size=1, log_every=1, report_to="none")
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg_path)]) == 0
    assert (tmp_path / "run" / "checkpoint-000004" / "trainable.safetensors").exists()
    # continue the same run for two more steps
    config["max_steps"] = 6
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg_path), "--resume", "latest"]) == 0
    assert (tmp_path / "run" / "checkpoint-000006").exists()
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
    assert [m["step"] for m in metrics][-2:] == [5, 6] and all(np.isfinite(m["loss"]) for m in metrics)

    model = tmp_path / "model"
    assert main(["export", str(tmp_path / "run"), str(model)]) == 0
    story = tmp_path / "story.txt"
    story.write_text("2 | picks up the mug\n1.5 | puts the mug down\n")
    out = tmp_path / "out.mp4"
    capsys.readouterr()
    assert main(["generate", str(story), "-o", str(out), "--model", str(model), "--steps", "1", "-q"]) == 0
    assert probe_video(out).num_frames == 16 + 12

    # a config with a typo fails at start, naming the key
    config["optimiser"] = {"lr": 1.0}
    cfg_path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "optimiser" in err and len(err.strip().splitlines()) == 1
