"""The README's commands run as written, and its worked example (a method, a dataset, a backbone) trains.

Every ```bash block of the README is preceded by a marker: ``<!-- readme-test: run -->`` (each command is run as
written, from a scratch folder) or ``<!-- readme-test: compose -->`` (commands that need hours, data or a GPU: a
training command is composed with ``--cfg job``, a table with ``--dry-run``, a make target is checked to exist).
Files of the worked example are marked ``<!-- readme-example: <path> -->``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"<!-- readme-(test|example): ([^ ]+) -->\n```(\w+)\n(.*?)```", re.S)


def _blocks(kind: str) -> list[tuple[str, str]]:
    return [(arg, body) for k, arg, _, body in BLOCK.findall(README) if k == kind]


def _commands(mode: str) -> list[str]:
    return [
        line.split("  #")[0].strip()
        for arg, body in _blocks("test")
        if arg == mode
        for line in body.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f".:{ROOT}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1"}


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    command = re.sub(r"(^|\s)python(?=\s)", lambda m: m.group(1) + shlex.quote(sys.executable), command)  # this venv
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def test_every_bash_block_is_marked():
    assert README.count("```bash") == len([1 for k, _, lang, _ in BLOCK.findall(README) if k == "test"])
    assert {a for a, _ in _blocks("test")} <= {"run", "compose"}


def _needs_make(command: str) -> bool:
    return command.startswith("make ")


@pytest.mark.parametrize("command", _commands("run"))
def test_short_commands_run_as_written(command, tmp_path):
    cwd = ROOT if _needs_make(command) else tmp_path
    if _needs_make(command) and not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make targets need the installed .venv (make install)")
    out = _run(command, cwd)
    assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"


def _composed(command: str) -> str:
    """How a long command is checked without running it."""
    words = shlex.split(command)
    if words[:2] == ["make", "test"]:
        return "make -n test"
    if words[:2] == ["make", "train"]:
        return "python -m peftbench.train --cfg job"
    if words[0] == "make" and words[1].startswith("table-"):
        name = words[1].removeprefix("table-").replace("-", "_")
        return shlex.join(["python", "-m", "peftbench.tables", name, *words[2:], "--dry-run"])
    if "peftbench.train" in command:
        return command + " --cfg job"
    raise AssertionError(f"no way to check {command!r}: mark it run, or teach this test")


@pytest.mark.parametrize("command", _commands("compose"))
def test_long_commands_compose(command, tmp_path):
    _write_example(tmp_path)
    check = _composed(command)
    out = _run(check, ROOT if check.startswith("make") else tmp_path)
    assert out.returncode == 0, f"{check}\n{out.stderr[-3000:]}"


def _write_example(folder: Path) -> None:
    for path, body in _blocks("example"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(body)


def test_the_worked_example_trains(tmp_path, monkeypatch):
    """The README's method, dataset and backbone: a run with NormTuning on my_task trains exactly the LayerNorms."""
    from torch import nn

    from peftbench.compose import compose_config, instantiate_group
    from tests.datagen import make_vtab_folder
    from tests.helpers import train_cli

    _write_example(tmp_path)
    make_vtab_folder(tmp_path / "data" / "my_task", num_classes=5, counts={"train800": 10, "val200": 5, "test": 5})
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    code, out, err = train_cli(search, "method=norm_tuning", "dataset=my_task", f"paths.data_dir={tmp_path / 'data'}",
                               f"paths.output_dir={tmp_path / 'out'}", f"run_dir={tmp_path / 'run'}",
                               "trainer.max_epochs=1", "logger=none")
    assert code == 0, err
    import json

    record = json.loads((tmp_path / "run" / "results.json").read_text())
    model = instantiate_group(compose_config(["backbone.pretrained=false"]).backbone, "backbone", num_classes=5)
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
    assert record["status"] == "ok" and record["params"]["trainable_backbone"] == norms
    backbone = compose_config([search, "backbone=vit_s16", "backbone.pretrained=false"]).backbone
    vit_s = instantiate_group(backbone, "backbone", num_classes=5)  # random weights: nothing downloaded
    assert sum(p.numel() for p in vit_s.parameters()) > 20_000_000
