"""scripts/demo_recipe.sh, the embedded demo model's recipe end to end: every command it runs must parse with
today's CLI, its training configs must write and read where its done-markers look, and it must say
nothing that the demo model's README does not (the two list the same commands)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from egolcd.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "demo_recipe.sh"


def _geometry(name: str) -> dict[str, str]:
    """The script's variables for ``GEOMETRY=name``, read from its ``case "$GEOMETRY"`` block."""
    for line in SCRIPT.read_text().splitlines():
        m = re.match(r"\s+([\w-]+)\) (TAG=.*);;$", line)
        if m and m.group(1) == name:
            pairs = [p.strip().split("=", 1) for p in m.group(2).split(";") if p.strip()]
            return {"GEOMETRY": name, **{k: v for k, v in pairs}}
    raise AssertionError(f"no GEOMETRY {name} in the script")


def _default_geometry() -> str:
    """The GEOMETRY the script runs when none is given (the embedded model's)."""
    m = re.search(r'^GEOMETRY="\$\{GEOMETRY:-([\w-]+)\}"$', SCRIPT.read_text(), re.M)
    assert m, "no GEOMETRY default in the script"
    return m.group(1)


DEFAULT = _default_geometry()


def _steps(geometry: str = DEFAULT) -> list[tuple[str, str | None, list[str]]]:
    """(name, folder cleared first or None, egolcd argv) of every ``step`` line, continuations joined, with the
    variables of ``GEOMETRY=geometry`` (default: the script's default)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    values = {"THREADS": "2", **_geometry(geometry)}
    steps = []
    for line in text.splitlines():
        if not line.startswith("step ") or '"$EGOLCD"' not in line:
            continue
        line = line.replace('"$REPO/', f'"{REPO}/')
        line = re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), line)
        words = shlex.split(line)
        name, rest = words[1], words[2:]
        fresh = None
        if rest[0] == "fresh":
            fresh, rest = rest[1], rest[2:]
        if rest[0] == "processes":  # the trainings, on PROCESSES processes (the argv is the one-process command)
            rest = rest[1:]
        assert rest[0] == "$EGOLCD", line
        steps.append((name, fresh, rest[1:]))
    return steps


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("geometry", ["demo", "demo-t2"])
def test_every_step_parses_with_the_cli(geometry):
    steps = _steps(geometry)
    assert [s[0] for s in steps] == [
        "data", "vae", "init", "latents", "stage1", "export1", "poshead", "stage2", "export2"
    ]
    parser = build_parser()
    for name, _, argv in steps:
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown or misspelt option
        assert callable(args.func), name


@pytest.mark.parametrize("geometry", ["demo", "demo-t2"])
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_training_configs_match_the_other_steps(stage, geometry):
    """The trainings read the latents and init models the other steps write, and are exported from, with the
    geometry's preset everywhere."""
    steps = {name: (fresh, argv) for name, fresh, argv in _steps(geometry)}
    for name in ("vae", "init", "latents"):
        argv = steps[name][1]
        assert argv[argv.index("--preset") + 1] == geometry, name
    config = yaml.safe_load(Path(steps[stage][1][1]).read_text())
    assert config["preset"] == geometry
    latents = steps["latents"][1]
    assert config["data"] == latents[latents.index("--out") + 1]
    made_by = {"stage1": "init", "stage2": "poshead"}[stage]
    assert config["init_model"] == steps[made_by][1][1] == steps[made_by][0]  # create-model's (cleared) folder
    fresh, export = steps["export1" if stage == "stage1" else "export2"]
    assert export[1] == config["output_dir"] and export[2] == fresh


def test_only_quick_steps_clear_their_folder():
    """An interrupted training, VAE or data step resumes: only model-folder writers start afresh."""
    cleared = {name for name, fresh, _ in _steps() if fresh is not None}
    assert cleared == {"init", "export1", "poshead", "export2"}


def test_demo_readme_lists_the_same_commands():
    readme = (REPO / "egolcd" / "assets" / "demo" / "README.md").read_text()
    for name, _, argv in _steps():
        head = " ".join(argv[:2]) if argv[0] != "train" else f"train configs/train/{Path(argv[1]).name}"
        assert re.search(re.escape(head), readme), f"{name}: {head!r} is not in the demo README"


def test_rerun_skips_finished_steps_and_retries_the_interrupted_one(tmp_path):
    """The orchestration itself (egolcd replaced by a recorder, since the real steps take 100 min): a step that
    fails stops the script; the rerun skips what finished and starts from the failed step."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-egolcd"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$1" >> "{calls}"\n'
        f'if [[ "$1" == train && ! -e "{tmp_path}/allow" ]]; then exit 3; fi\n'
    )
    fake.chmod(0o755)
    work = tmp_path / "work"
    env = {"PATH": "/usr/bin:/bin", "EGOLCD": str(fake), "THREADS": "1", "PROCESSES": "1"}
    first = subprocess.run(["bash", str(SCRIPT), str(work)], env=env, capture_output=True, text=True)
    assert first.returncode == 3
    assert calls.read_text().split() == ["prepare-data", "train-vae", "create-model", "prepare-latents", "train"]
    (tmp_path / "allow").touch()
    calls.unlink()
    model = work / _geometry(DEFAULT)["MODEL"]
    model.mkdir(parents=True)
    (model / "stale.txt").write_text("left by an interrupted export")
    second = subprocess.run(["bash", str(SCRIPT), str(work)], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert calls.read_text().split() == ["train", "export", "create-model", "train", "export"]
    assert not model.exists()  # cleared before the export (the recorder writes nothing)
    times = (work / "recipe-times.tsv").read_text().splitlines()
    assert {t.split("\t")[1] for t in times} == {DEFAULT}
    assert [t.split("\t")[2] for t in times] == [
        "data", "vae", "init", "latents", "stage1", "export1", "poshead", "stage2", "export2"
    ]
    calls.unlink()
    third = subprocess.run(["bash", str(SCRIPT), str(work)], env=env, capture_output=True, text=True)
    assert third.returncode == 0 and not calls.exists()


def test_trainings_run_on_two_processes_with_the_same_clips_per_step(tmp_path):
    """By default the DiT stages start two gloo processes (torchrun) with grad_accum halved, so a step still
    takes the configs' 4 clips, and the VAE two one-thread processes that split its global batch of 4; the
    other steps stay single commands. PROCESSES=3 is refused."""
    calls = tmp_path / "calls.txt"
    for name in ("fake-egolcd", "fake-python"):
        fake = tmp_path / name
        fake.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{calls}"\n')
        fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "EGOLCD": str(tmp_path / "fake-egolcd"), "PYTHON": str(tmp_path / "fake-python"),
           "THREADS": "2"}
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    trainings = [line for line in lines if " train " in f"{line} "]
    assert len(trainings) == 2 and all(line.startswith("fake-python -m torch.distributed.run --standalone "
                                                       "--nproc_per_node 2 -m egolcd train ") for line in trainings)
    assert all(line.endswith("--resume latest --set grad_accum=2") for line in trainings)
    for stage in ("stage1", "stage2"):
        for tag in ("v2", "t2"):
            assert yaml.safe_load((REPO / "configs" / "train" / f"demo-{tag}-{stage}.yaml").read_text())["grad_accum"] == 4
    vae = [line for line in lines if " train-vae " in line]
    assert len(vae) == 1 and vae[0].startswith("fake-python -m torch.distributed.run --standalone --nproc_per_node 2 "
                                               "-m egolcd train-vae ")
    assert " --batch-size 4 " in vae[0] and vae[0].endswith("--resume --threads 1")  # one thread each, the last word
    assert sum(line.startswith("fake-egolcd ") for line in lines) == 6
    bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "bad")], env={**env, "PROCESSES": "3"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "PROCESSES must be 1, 2 or 4" in bad.stderr


def test_geometries_keep_their_own_done_markers(tmp_path):
    """GEOMETRY=demo-t2 in a WORKDIR where the demo recipe finished runs every step again (its own markers and
    folders: the data step too, which finds its data already there), into models/demo-t2; an unknown geometry is
    refused before anything runs."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-egolcd"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    env = {"PATH": "/usr/bin:/bin", "EGOLCD": str(fake), "THREADS": "1", "PROCESSES": "1"}
    demo = subprocess.run(["bash", str(SCRIPT), str(work)], env={**env, "GEOMETRY": "demo"}, capture_output=True)
    assert demo.returncode == 0
    assert calls.read_text().splitlines()[-1] == "export runs/demo-v2-stage2 models/demo --memory-guidance 2"
    calls.unlink()
    t2 = subprocess.run(["bash", str(SCRIPT), str(work)], env={**env, "GEOMETRY": "demo-t2"},
                        capture_output=True, text=True)
    assert t2.returncode == 0, t2.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 9 and lines[-1] == "export runs/demo-t2-stage2 models/demo-t2 --memory-guidance 2"
    assert "--preset demo-t2" in lines[1] and "--steps 5600" in lines[1]
    assert lines[6].endswith("--init-from models/demo-t2-stage1 --position-heads 4")  # half of its 8 heads
    times = [t.split("\t") for t in (work / "recipe-times.tsv").read_text().splitlines()]
    assert [t[1] for t in times] == ["demo"] * 9 + ["demo-t2"] * 9  # both geometries' steps, each named
    calls.unlink()
    bad = subprocess.run(["bash", str(SCRIPT), str(work)], env={**env, "GEOMETRY": "demo-t3"},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "GEOMETRY must be demo or demo-t2" in bad.stderr and not calls.exists()
