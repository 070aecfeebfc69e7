"""results.json is written atomically; the index takes concurrent appends; the schedule has the right shape."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from peftbench.records.results import append_index, read_index, write_json_atomic
from peftbench.training.schedulers import cosine_with_warmup


class Unserialisable:
    def __str__(self):
        raise RuntimeError("boom")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "ok", "acc": 0.9})
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"status": "ok", "bad": Unserialisable()})
    assert json.loads(path.read_text()) == {"status": "ok", "acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def _append(args):
    path, i = args
    append_index(path, {"run": i, "pad": "x" * 5000})


def test_index_concurrent_appends_stay_whole(tmp_path):
    path = tmp_path / "index.jsonl"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append, [(path, i) for i in range(64)])
    assert sorted(r["run"] for r in read_index(path)) == list(range(64))


def test_cosine_with_warmup_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=100, steps_per_epoch=10, warmup_epochs=2)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 20) and lrs[19] == pytest.approx(1.0)  # linear warm-up over 20 steps
    assert lrs[20] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5, abs=0.01)  # cosine midpoint
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
