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


def _steps() -> list[tuple[str, str, list[str]]]:
    """(name, done marker, egolcd argv) of every ``step`` line of the script, continuations joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if not line.startswith("step ") or '"$EGOLCD"' not in line:
            continue
        words = shlex.split(line.replace('"$THREADS"', "2").replace('"$REPO/', f'"{REPO}/'))
        name, marker, exe, *argv = words[1:]
        assert exe == "$EGOLCD", line
        steps.append((name, marker, argv))
    return steps


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_step_parses_with_the_cli():
    steps = _steps()
    assert [s[0] for s in steps] == [
        "data", "vae", "init", "latents", "stage1", "export1", "poshead", "stage2", "export2"
    ]
    parser = build_parser()
    for name, _, argv in steps:
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown or misspelt option
        assert callable(args.func), name


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_training_configs_match_the_markers(stage):
    """The trainings' output dirs, data and init models are where the other steps write and look."""
    steps = {name: (marker, argv) for name, marker, argv in _steps()}
    marker, argv = steps[stage]
    config = yaml.safe_load(Path(argv[1]).read_text())
    assert marker.startswith(config["output_dir"] + "/checkpoint-")
    assert marker == f"{config['output_dir']}/checkpoint-{config['max_steps']:06d}/trainer_state.json"
    latents_out = steps["latents"][1][steps["latents"][1].index("--out") + 1]
    assert config["data"] == latents_out
    made_by = {"stage1": "init", "stage2": "poshead"}[stage]
    assert config["init_model"] == steps[made_by][1][1]  # create-model's folder
    export = steps["export1" if stage == "stage1" else "export2"][1]
    assert export[1] == config["output_dir"]


def test_demo_readme_lists_the_same_commands():
    readme = (REPO / "egolcd" / "assets" / "demo" / "README.md").read_text()
    for name, _, argv in _steps():
        head = " ".join(argv[:2]) if argv[0] != "train" else f"train configs/train/{Path(argv[1]).name}"
        assert re.search(re.escape(head), readme), f"{name}: {head!r} is not in the demo README"
