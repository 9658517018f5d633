"""Metrics and the evaluation report on synthetic videos (CPU, no network, tiny random local models)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from egolcd import metrics as M
from egolcd.narrative import CompiledNarrative, Narrative, Segment, compile_narrative
from egolcd.report import evaluate_main, summary_text
from egolcd.video_io import VideoReadError, VideoWriter

FPS, SIZE = 8, 64


# --------------------------------------------------------------------------------------- synthetic scenes
def _canvas(seed: int = 0, width: int = 320) -> np.ndarray:
    """A smooth random colour texture ``(SIZE, width, 3)`` float in [0, 255] (the "world")."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, SIZE // 16, width // 16)))
    return (
        torch.nn.functional.interpolate(coarse, size=(SIZE, width), mode="bicubic")[0]
        .permute(1, 2, 0)
        .numpy()
    )


def _pan(canvas: np.ndarray, xs: list[int], tint: np.ndarray | None = None) -> np.ndarray:
    """Camera views at horizontal offsets ``xs``; ``tint`` ``(T, 3)`` multiplies each frame's colours."""
    frames = np.stack([canvas[:, x : x + SIZE] for x in xs])
    if tint is not None:
        frames = frames * tint[:, None, None, :]
    return np.clip(frames, 0, 255).round().astype(np.uint8)


XS_STABLE = [t // 16 for t in range(48)]  # a nearly still camera (0..2 px)


def _drifting(canvas: np.ndarray) -> np.ndarray:
    t = np.linspace(0, 1, len(XS_STABLE))[:, None]
    return _pan(canvas, XS_STABLE, 1 + t * np.array([0.6, -0.5, -0.5]))  # turns red over time


def _compiled() -> CompiledNarrative:
    segments = [
        Segment("a", 1.0, "looks at the bench"),
        Segment("b", 1.0, "walks away"),
        Segment("c", 1.0, "comes back", revisit="a"),
    ]
    return compile_narrative(
        Narrative(segments, scene="a workshop", fps=FPS), fps=FPS, chunk_frames=1, vae_temporal=1
    )


# segments of 8 frames: a views x = 0..7, b walks to x = 200.., c returns to x = 0..5 (exact) or not
XS_RETURN = list(range(8)) + [100 + 15 * i for i in range(8)] + [50, 25, 0, 1, 2, 3, 4, 5]
XS_ELSEWHERE = list(range(8)) + [100 + 15 * i for i in range(8)] + [230 + i for i in range(8)]


# --------------------------------------------------------------------------------------- consistency / drift
def test_descriptor_shapes_and_unit_norm() -> None:
    x = torch.rand(3, 3, 40, 56)
    full, border = M.descriptor_features(x), M.descriptor_features(x, border=0.25)
    assert full.shape == (3, 768 + 128) and border.shape[0] == 3 and border.shape[1] < full.shape[1]
    assert torch.allclose(full.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_drift_larger_for_drifting_video() -> None:
    canvas = _canvas()
    stable, drifting = _pan(canvas, XS_STABLE), _drifting(canvas)
    s_stable, s_drift = M.subject_consistency(stable), M.subject_consistency(drifting)
    assert s_stable.shape == (len(XS_STABLE) - 1,)
    assert M.drift(s_drift) > 5 * M.drift(s_stable) and M.drift(s_drift) > 0.05
    b_stable, b_drift = M.background_consistency(stable), M.background_consistency(drifting)
    assert M.drift(b_drift) > 5 * M.drift(b_stable)
    assert M.nrdp(s_stable, s_drift) == 0.0  # generated drifts less than the reference
    assert M.nrdp(s_drift, s_stable) > 0.05


def test_drift_and_nrdp_values() -> None:
    scores = np.array([1.0] * 3 + [0.5] * 14 + [0.2] * 3)  # 20 scores: 15% = 3 at each end
    assert M.drift(scores) == pytest.approx(0.8)
    ref = np.array([0.9] * 17 + [0.8] * 3)
    ref_drift, ref_mean = 0.1, ref.mean()
    assert M.nrdp(scores, ref) == pytest.approx((0.8 - ref_drift) / ref_mean)
    assert M.nrdp(ref, scores) == 0.0
    assert M.window_curve(np.arange(10), 4) == [1.5, 5.5, 8.5]
    with pytest.raises(ValueError):
        M.drift([])


def test_flicker_scores() -> None:
    static = np.full((5, 8, 8, 3), 77, np.uint8)
    blink = np.stack([np.full((8, 8, 3), 255 * (t % 2), np.uint8) for t in range(5)])
    assert M.temporal_flicker(static) == 1.0
    assert M.temporal_flicker(blink) == 0.0
    assert M.flicker_scores(blink).shape == (4,)


# --------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_ssim_known_values() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    assert torch.allclose(M.ssim(img, img), torch.ones(2, dtype=torch.float64))
    assert torch.isinf(M.psnr(img, img)).all()
    a, b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 110, np.uint8)
    assert float(M.psnr(a, b)) == pytest.approx(10 * math.log10(255**2 / 100))
    c1 = (0.01 * 255) ** 2  # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    assert float(M.ssim(a, b)) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    values = [float(M.ssim(img[:1], n[:1])) for n in noisy]
    assert 1 > values[0] > values[1] > values[2]
    # float torch input in [0, 1] gives the same value as uint8 in [0, 255]
    t = torch.from_numpy(img).permute(0, 3, 1, 2).double() / 255
    tn = torch.from_numpy(noisy[1]).permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(M.ssim(t, tn, data_range=1.0), M.ssim(img, noisy[1]))


def test_ssim_matches_gaussian_filter_reference() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)

    def reference(
        x: np.ndarray, y: np.ndarray
    ) -> float:  # Wang et al.: 11x11 Gaussian, sigma 1.5, valid part
        def f(z: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(z, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]

        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        mx, my = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        return float(
            (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean()
        )

    expected = np.mean([reference(a[..., c].astype(float), b[..., c].astype(float)) for c in range(3)])
    assert float(M.ssim(a, b)) == pytest.approx(expected, rel=1e-9)


# Values of the hand-written PSNR/SSIM that torchmetrics replaced (float64 formula; SSIM: separable 11-tap
# Gaussian, sigma 1.5, averaged over valid positions), computed at commit 89067d8 on these inputs.
HAND_WRITTEN = [
    ((2, 32, 32, 3), 10, [28.505698304186758, 28.43264786615267], [0.9911994715264771, 0.9914107503547668]),
    ((1, 40, 50, 3), 30, [19.212314638859272], [0.9245809083495113]),
    ((1, 11, 17, 3), 60, [14.157042946242067], [0.7751571345131689]),
]


def test_psnr_ssim_match_the_hand_written_values() -> None:
    rng = np.random.default_rng(16)
    for shape, noise, psnrs, ssims in HAND_WRITTEN:
        a = rng.integers(0, 256, shape).astype(np.uint8)
        b = np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)
        p, q = M.psnr(a, b), M.ssim(a, b)
        assert p.dtype == q.dtype == torch.float64 and p.shape == q.shape == (shape[0],)
        # torchmetrics keeps log(data_range) and 10/log(10) in float32: ~1e-6 dB from the float64 formula
        assert p.numpy() == pytest.approx(psnrs, abs=1e-5)
        assert q.numpy() == pytest.approx(ssims, abs=1e-12)


def test_ssim_small_images_use_a_window_that_fits() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (1, 7, 9, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    assert 0 < float(M.ssim(a, b)) < 1 and float(M.ssim(a, a)) == pytest.approx(1.0)
    one = rng.integers(0, 256, (1, 1, 1, 3)).astype(np.uint8)
    assert float(M.ssim(one, one)) == pytest.approx(1.0)


def test_revisit_exact_return_scores_higher() -> None:
    canvas, compiled = _canvas(), _compiled()
    assert compiled.revisits == {2: 0}
    back = M.revisit_consistency(_pan(canvas, XS_RETURN), compiled)
    away = M.revisit_consistency(_pan(canvas, XS_ELSEWHERE), compiled)
    assert len(back) == len(away) == 1
    assert (back[0].segment, back[0].revisited, back[0].pairs) == ("c", "a", 8)
    assert back[0].first_visit_frame == 0 and back[0].revisit_frame == 16 + 2  # the frame at x = 0
    assert back[0].ssim > 0.95 and back[0].psnr > 35
    assert away[0].ssim < back[0].ssim - 0.3 and away[0].psnr < back[0].psnr - 15
    exact = M.revisit_consistency(_pan(canvas, XS_STABLE[:8] * 3), compiled)[0]
    assert exact.ssim == pytest.approx(1.0) and exact.psnr == M.PSNR_CAP


# --------------------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 4 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    s = a @ a.T
    assert M.frechet_distance(mu1[:1].repeat(5), s, mu1[:1].repeat(5), s) == pytest.approx(0, abs=1e-6)
    # scalar Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert M.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == (
        pytest.approx(4 + 1)
    )


def test_frechet_distance_matches_scipy() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = M.feature_stats(x), M.feature_stats(y)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------------------- local models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random VideoMAE and a tiny random CLIP with a real (byte-level BPE) CLIP tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, VideoMAEConfig, VideoMAEModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vcfg = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    VideoMAEModel(vcfg).save_pretrained(root / "videomae")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte as a token: no merges needed
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "clip"
    )
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "clip")
    return {"videomae": root / "videomae", "clip": root / "clip"}


def test_fvd_with_tiny_videomae(tiny_models: dict[str, Path]) -> None:
    canvas = _canvas()
    encoder = M.VideoMAEFeatures(tiny_models["videomae"])
    feats = encoder(_pan(canvas, XS_STABLE))
    assert feats.shape == (len(XS_STABLE) // 4, 32) and np.isfinite(feats).all()
    assert encoder(_pan(canvas, [0, 1])).shape == (1, 32)  # shorter than a clip: padded
    same = M.fvd(feats, feats)
    other = M.fvd(feats, encoder(_drifting(_canvas(seed=3))))
    assert abs(same) < 1e-6 and math.isfinite(other) and other > same
    out = M.evaluate_video(_pan(canvas, XS_STABLE), _drifting(canvas), fps=FPS, fvd_encoder=encoder)
    assert math.isfinite(out["fvd"]) and "fvd" not in out["skipped"]
    weights = f"VideoMAEModel from {tiny_models['videomae']}"
    assert out["fvd_by"] == f"{M.FVD_IMPLEMENTATION}, features of {weights}"


def test_clip_score_with_tiny_clip(tiny_models: dict[str, Path]) -> None:
    scorer = M.ClipScorer(tiny_models["clip"])
    compiled = _compiled()
    per = scorer.segment_scores(_pan(_canvas(), XS_RETURN), compiled)
    assert len(per) == 3 and all(math.isfinite(v) and -1 <= v <= 1 for v in per)
    emb = scorer.text_embeddings(compiled.prompts)  # long prompts are truncated to the context length
    assert emb.shape == (3, 16)
    encoder = M.ImageEncoder(tiny_models["clip"])  # CLIP image features for consistency
    assert np.isfinite(M.subject_consistency(_pan(_canvas(), XS_STABLE[:6]), encoder)).all()


def test_skip_messages_without_models() -> None:
    canvas = _canvas()
    out = M.evaluate_video(_pan(canvas, XS_RETURN), _pan(canvas, XS_RETURN), _compiled(), fps=FPS)
    assert out["fvd"] is None and out["skipped"]["fvd"] == M.FVD_SKIP
    assert "fvd_by" not in out
    assert out["clip_score"] is None and out["skipped"]["clip_score"] == M.CLIP_SKIP
    assert M.FVD_SKIP == "FVD needs --fvd-model PATH (local weights of a VideoMAE model); skipped"
    assert out["nrdp_subject"] == 0.0 and out["revisit_ssim"] > 0.95


def test_model_path_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory") as info:
        M.VideoMAEFeatures(tmp_path / "missing")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot load CLIP model") as info:
        M.ClipScorer(tmp_path)  # empty folder
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- evaluate_main
def _write(path: Path, frames: np.ndarray) -> str:
    with VideoWriter(path, fps=FPS, width=SIZE, height=SIZE) as writer:
        writer.write(frames)
    return str(path)


NARRATIVE = """scene: a workshop
fps: 8
segments:
  - {id: a, seconds: 1, action: looks at the bench}
  - {id: b, seconds: 1, action: walks away}
  - {id: c, seconds: 1, action: comes back, revisit: a}
"""


@pytest.fixture()
def videos(tmp_path: Path) -> dict[str, str]:
    canvas = _canvas()
    (tmp_path / "walk.yaml").write_text(NARRATIVE)
    back = _write(tmp_path / "back.mp4", _pan(canvas, XS_RETURN))
    # the reference is the same footage; copied, since libx264 output is not byte-reproducible
    shutil.copyfile(back, tmp_path / "ref.mp4")
    return {
        "back": back,
        "away": _write(tmp_path / "away.mp4", _pan(canvas, XS_ELSEWHERE)),
        "ref": str(tmp_path / "ref.mp4"),
        "narrative": str(tmp_path / "walk.yaml"),
    }


def test_evaluate_main_writes_json_and_html(tmp_path: Path, videos: dict[str, str]) -> None:
    html_path, json_path = tmp_path / "report.html", tmp_path / "out.json"
    result = evaluate_main(
        [videos["back"], videos["away"]],
        videos["ref"],
        videos["narrative"],
        str(html_path),
        str(json_path),
        labels=["egolcd", "window"],
    )
    data = json.loads(json_path.read_text())
    assert set(data) == {"videos", "reference", "narrative", "revisits", "models", "notes"}
    assert list(data["videos"]) == ["egolcd", "window"] and data["revisits"] == [["c", "a"]]
    for m in data["videos"].values():
        for key in (
            "nrdp_subject",
            "nrdp_background",
            "drift_subject",
            "flicker",
            "revisit_psnr",
            "revisit_ssim",
            "fvd",
            "clip_score",
            "curves",
            "revisits",
            "skipped",
            "path",
        ):
            assert key in m
        assert len(m["curves"]["seconds"]) == len(m["curves"]["subject"]) == 3  # 23 scores, 8 per window
    assert data["videos"]["egolcd"]["revisit_ssim"] > data["videos"]["window"]["revisit_ssim"] + 0.2
    assert data["videos"]["egolcd"]["nrdp_subject"] == pytest.approx(0.0, abs=1e-3)
    assert M.FVD_SKIP in data["notes"] and M.CLIP_SKIP in data["notes"]
    assert result["videos"]["egolcd"]["revisit_psnr"] == data["videos"]["egolcd"]["revisit_psnr"]
    page = html_path.read_text()
    assert (
        '<table class="metrics">' in page and "NRDP-Subject" in page and "egolcd" in page and "window" in page
    )
    assert page.count('<img alt="') == 2 and page.count("data:image/png;base64,") == 2  # curves + 1 revisit
    assert M.FVD_SKIP in page
    text = summary_text(result)
    assert text.splitlines()[0].startswith("video") and "reference" in text and M.CLIP_SKIP in text


def test_evaluate_main_with_tiny_models(
    tmp_path: Path, videos: dict[str, str], tiny_models: dict[str, Path]
) -> None:
    result = evaluate_main(
        [videos["away"]],
        videos["ref"],
        videos["narrative"],
        None,
        str(tmp_path / "m.json"),
        clip_model=str(tiny_models["clip"]),
        fvd_model=str(tiny_models["videomae"]),
    )
    m = result["videos"]["away"]
    assert math.isfinite(m["fvd"]) and math.isfinite(m["clip_score"]) and result["notes"] == []
    assert math.isfinite(result["reference"]["clip_score"])


def test_evaluate_main_bad_videos(tmp_path: Path, videos: dict[str, str]) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not an mp4 file" * 10)
    html_path = tmp_path / "r.html"
    for path in (str(bad), str(tmp_path / "missing.mp4")):
        with pytest.raises(VideoReadError) as info:
            evaluate_main([videos["back"], path], None, None, str(html_path), None)
        assert "\n" not in str(info.value) and Path(path).name in str(info.value)
    assert not html_path.exists()
    with pytest.raises(ValueError, match="2 labels for 1 videos"):
        evaluate_main([videos["back"]], None, None, None, None, labels=["a", "b"])
    with pytest.raises(OSError, match="does not exist"):
        evaluate_main([videos["back"]], None, None, str(tmp_path / "nodir" / "r.html"), None)
    one = _write(tmp_path / "one.mp4", _pan(_canvas(), [0]))
    with pytest.raises(ValueError, match="cannot evaluate .*at least 2 frames"):
        evaluate_main([one], None, None, None, None)


def test_evaluate_main_without_reference_or_narrative(tmp_path: Path, videos: dict[str, str]) -> None:
    result = evaluate_main([videos["back"]], None, None, str(tmp_path / "r.html"), None)
    m = result["videos"]["back"]
    assert m["nrdp_subject"] is None and m["revisits"] == [] and m["revisit_psnr"] is None
    assert result["reference"] is None and M.CLIP_SKIP in result["notes"]
    assert "<img" in (tmp_path / "r.html").read_text()
