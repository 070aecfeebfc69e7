"""Sweeps: a failed run is recorded and the sweep goes on; a re-run skips the runs already ``ok`` in the index."""

from __future__ import annotations

from peftbench.compose import compose_config, config_key
from peftbench.records.results import latest_by_key, read_index, run_key
from tests.helpers import TINY
from tests.test_cli import cli


def sweep(tmp_path, *extra: str):
    args = [*TINY, "trainer.max_epochs=1", f"paths.output_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun",
            "skip_done=true", "group=test-sweep", "+callbacks.crash._target_=tests.helpers.CrashAfterEpoch",
            "+callbacks.crash.epoch=0,99", "seed=0,1", *extra]
    return cli("peftbench.train", "--multirun", *args)


def test_failed_run_recorded_sweep_goes_on_and_rerun_skips_finished(tmp_path):
    out = sweep(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_index(tmp_path / "index.jsonl")
    assert len(records) == 4  # 2 crash values x 2 seeds: the crashes did not stop the sweep
    by_status = sorted(r["status"] for r in records)
    assert by_status == ["failed", "failed", "ok", "ok"]
    assert all(r["group"] == "test-sweep" for r in records)
    assert all("simulated crash" in r["error"] for r in records if r["status"] == "failed")
    assert len({r["key"] for r in records}) == 4

    again = sweep(tmp_path)  # the "interrupted" sweep re-run: only the two failed runs run again
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("peftbench: skipped (already ok") == 2
    records = read_index(tmp_path / "index.jsonl")
    assert len(records) == 6 and sorted(r["status"] for r in records[4:]) == ["failed", "failed"]
    latest = latest_by_key(tmp_path / "index.jsonl")
    assert sorted(r["status"] for r in latest.values()) == ["failed", "failed", "ok", "ok"]


def test_run_key_ignores_paths_logger_group_and_spelling():
    a = compose_config([*TINY, "seed=0"])
    b = compose_config([*TINY, "paths.output_dir=/elsewhere", "logger=csv", "group=g", "data.num_workers=3",
                        "method=lora"])  # method=lora is the default: same experiment
    c = compose_config([*TINY, "seed=1"])
    assert config_key(a) == config_key(b) != config_key(c)


def test_latest_by_key_never_replaces_ok_with_a_later_failure(tmp_path):
    from peftbench.records.results import append_index

    index = tmp_path / "index.jsonl"
    append_index(index, {"key": "k", "status": "ok", "run_dir": "a"})
    append_index(index, {"key": "k", "status": "failed", "run_dir": "b"})
    append_index(index, {"key": "j", "status": "failed", "run_dir": "c"})
    append_index(index, {"key": "j", "status": "ok", "run_dir": "d"})
    latest = latest_by_key(index)
    assert latest["k"]["run_dir"] == "a" and latest["j"]["run_dir"] == "d"
    assert run_key({"seed": 0, "run_dir": "x"}) == run_key({"seed": 0, "run_dir": "y"})


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from peftbench.compose import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _sweeps() -> list[str]:
    from peftbench.compose import CONFIG_DIR

    return sorted(p.stem for p in (__import__("pathlib").Path(CONFIG_DIR) / "sweep").glob("*.yaml"))


def test_every_sweep_composes_and_sweeps_existing_keys():
    from omegaconf import OmegaConf

    for name in _sweeps():
        cfg = _compose_with_hydra([f"sweep={name}"])
        assert cfg.skip_done is True and cfg.group == name and cfg.hydra.mode.name == "MULTIRUN", name
        params = cfg.hydra.sweeper.params
        tasks = params.dataset.split(",")
        assert len(tasks) == 19 and all(t.startswith("vtab/") for t in tasks), name  # listed explicitly
        for key in params:
            if key != "dataset":
                assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", f"{name}: {key} is not a config key"
        first = [f"{k}={str(v).split(',')[0]}" for k, v in params.items()]  # one point of the grid composes
        compose_config([f"sweep={name}", *first])


def test_launchers_compose():
    slurm = _compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    local = _compose_with_hydra(["hydra/launcher=local_parallel"]).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2


def test_group_is_the_wandb_group():
    cfg = compose_config(["group=heart_lora_ne_s"])
    assert cfg.logger.group == "heart_lora_ne_s"
    assert compose_config([]).logger.group is None
