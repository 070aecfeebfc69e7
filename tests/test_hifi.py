"""HiFi: information richness, correlation, PageRank (vs networkx), the scorer, the method, end to end."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from peftbench.backbones import anatomy
from peftbench.compose import compose_config
from peftbench.methods.base import merge, prepare_model, unmerge
from peftbench.methods.hifi import HiFi as HiFiMethod
from peftbench.scorers.hifi import HiFi, head_correlation, head_key, information_richness, pagerank
from peftbench.train import execute
from tests.helpers import TINY


def tiny_vit(depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=4, num_classes=3)


def batches(n: int = 2, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def test_information_richness_known_spectrum_and_loop():
    u, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    o = u @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)) @ v.T  # (N=10, D=4)
    # cumulative mass 8/15, 12/15, 14/15, 1 -> first >= 0.9 at t=3; >= 0.5 at t=1
    o = o.view(1, 10, 1, 4)
    assert information_richness(o, 0.9).item() == 3
    assert information_richness(o, 0.5).item() == 1
    x = torch.randn(3, 7, 5, 6)  # (B, N, H, D)
    got = information_richness(x, 0.9)
    for i in range(3):
        for h in range(5):
            s = np.linalg.svd(x[i, :, h].double().numpy(), compute_uv=False)
            expected = int(np.argmax(np.cumsum(s) / s.sum() >= 0.9)) + 1
            assert got[i, h].item() == expected


def test_correlation_matches_numpy_cov():
    x = torch.randn(2, 9, 4, 6)  # (B, N, H, D)
    r = head_correlation(x)
    for i in range(2):
        m = x[i].double().mean(0).numpy()  # (H, D) token means
        expected = np.abs(np.cov(m))  # rows = variables (heads), unbiased over D
        np.fill_diagonal(expected, 0.0)
        np.testing.assert_allclose(r[i].numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("teleport", ["uniform", "information"])
def test_pagerank_matches_networkx(teleport):
    g = torch.Generator().manual_seed(3)
    h = 6
    a = torch.rand(h, h, generator=g, dtype=torch.float64)
    corr = (a + a.T) * (1 - torch.eye(h, dtype=torch.float64))
    corr[0, 1:] *= 5  # uneven rows: row- vs column-normalisation matter
    corr[1:, 0] *= 5
    info = torch.randint(1, 10, (h,), generator=g).double()
    p, iters = pagerank(info, corr, d=0.85, eps=1e-13, max_iter=1000, teleport=teleport)
    graph = nx.from_numpy_array(corr.numpy(), create_using=nx.DiGraph)
    pers = {i: float(info[i] / info.sum()) for i in range(h)} if teleport == "information" else None
    ref = nx.pagerank(graph, alpha=0.85, personalization=pers, tol=1e-14, max_iter=1000, weight="weight")
    np.testing.assert_allclose(p.numpy(), [ref[i] for i in range(h)], atol=1e-10)
    assert abs(float(p.sum()) - 1) < 1e-12 and 1 < iters < 1000


def test_uniform_teleport_fixed_point_ignores_information():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(5, 5, generator=g, dtype=torch.float64)
    corr = (a + a.T) * (1 - torch.eye(5, dtype=torch.float64))
    i1, i2 = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([9.0, 1, 1, 1, 1])
    p1, _ = pagerank(i1, corr, eps=1e-14, max_iter=1000)
    p2, _ = pagerank(i2, corr, eps=1e-14, max_iter=1000)
    torch.testing.assert_close(p1, p2, atol=1e-12, rtol=0)
    q1, _ = pagerank(i1, corr, eps=1e-14, max_iter=1000, teleport="information")
    q2, _ = pagerank(i2, corr, eps=1e-14, max_iter=1000, teleport="information")
    assert (q1 - q2).abs().max() > 1e-3


def test_scorer_is_pure_and_shaped():
    model = tiny_vit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = HiFi()(model, batches())
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for b in anatomy.blocks(model):
        p, info, corr = (scores[head_key(b, w)] for w in ("pagerank", "info", "corr"))
        assert p.shape == info.shape == (4,) and corr.shape == (4, 4)
        assert abs(float(p.sum()) - 1) < 1e-5
        assert (info >= 1).all() and (info <= min(17, 12)).all()
        assert torch.equal(corr.diagonal(), torch.zeros(4))
    again = HiFi()(model, batches())
    assert all(torch.equal(scores[k], again[k]) for k in scores)


@pytest.mark.parametrize("strategy", ["layer_wise", "mid_top"])
def test_method_tunes_only_selected_head_rows(strategy):
    model = tiny_vit()
    views = anatomy.blocks(model)
    w0 = [b.linear("q").weight.detach().clone() for b in views]
    method = HiFiMethod(k=2, strategy=strategy)
    state = prepare_model(model, method, HiFi(), lambda: batches())
    tuned = views[2:] if strategy == "mid_top" else views
    assert sorted(state["heads"]) == sorted(b.path for b in tuned)
    n_backbone = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    assert n_backbone == state["trainable_backbone"] == len(tuned) * 2 * 3 * 12 * 48
    assert method.describe(state)["heads"] == state["heads"]

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for x, y in batches(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x = batches(1)[0][0]
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    for b, w in zip(views, w0):
        diff = (b.linear("q").base_layer.weight if b in tuned else b.linear("q").weight) - w  # merged weight
        changed = diff.ne(0).any(1)  # (3C,) rows
        expected = torch.zeros(3 * 48, dtype=torch.bool)
        if b in tuned:
            expected[anatomy.qkv_rows(48, 4, heads=state["heads"][b.path])] = True
        assert torch.equal(changed, expected), b.path
    with torch.no_grad():
        unmerge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_end_to_end_run(tmp_path):
    cfg = compose_config(
        TINY
        + [
            f"paths.output_dir={tmp_path}/outputs",
            "method=hifi",
            "trainer.max_epochs=1",
            "scoring.n_samples=16",
            "scoring.batch_size=16",
        ]
    )
    record = execute(cfg, tmp_path / "run")
    assert record["status"] == "ok", record.get("error")
    sel = record["selection"]
    assert len(sel["heads"]) == 6 and all(len(h) == 3 for h in sel["heads"].values())
    assert record["params"]["trainable_backbone"] == sel["trainable_backbone"] == 6 * 3 * 3 * 16 * 192


def test_hifi_on_swin_windows_and_per_stage_ratio():
    """Swin (windowed attention, 2 and 4 heads per stage): I_h is a per-window mean inside [1, min(N_w, D)];
    ratio picks round(ratio * H) heads per stage; trainable = sum 3 k_l D_l C_l; merged == unmerged."""
    from timm.models.swin_transformer import SwinTransformer

    from peftbench.backbones import anatomy
    from peftbench.methods.base import merge, prepare_model
    from peftbench.methods.hifi import HiFi as HiFiMethod
    from peftbench.scorers.hifi import HiFi as HiFiScorer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 4), num_classes=3).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    scores = HiFiScorer()(model, [(x, y)])
    views = [b for b in anatomy.blocks(model) if b.attn is not None]
    for b in views:
        info = scores[f"{b.path}.attn:info"]
        assert info.shape == (b.num_heads,) and (info >= 1).all() and (info <= min(16, b.head_dim)).all()
    method = HiFiMethod(ratio=0.5)
    state = prepare_model(model, method, HiFiScorer(), lambda: [(x, y)])
    assert [len(state["heads"][b.path]) for b in views] == [1, 1, 2, 2]
    expected = sum(3 * len(state["heads"][b.path]) * b.head_dim * b.dim for b in views)
    assert state["trainable_backbone"] == expected
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "head" not in n) == expected
    for p in (p for n, p in model.named_parameters() if p.requires_grad and "head" not in n):
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        before = model(x)
        merge(model)
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_hifi_vtab_gives_hifi_the_same_search_as_its_rivals_and_cites_the_paper():
    """Every row of the HiFi table searches five points per task; HiFi's are learning rates including its paper's
    grid (1e-4, 2e-4, 3e-4; Gui and Xiao, ACL 2023, Table 5), as LoRA's and Heart-LoRA's are scales."""
    from pathlib import Path

    from peftbench.tables.spec import load_spec

    spec = load_spec("hifi_vtab")
    sizes = {r.name: sum(len(v) for v in r.search.values()) for r in spec.rows if r.overrides is not None}
    assert set(sizes) == {"LoRA", "Heart-LoRA", "HiFi"} and set(sizes.values()) == {5}
    lrs = next(r for r in spec.rows if r.name == "HiFi").search["optimizer.lr"]
    assert {1e-4, 2e-4, 3e-4} <= set(lrs)
    root = Path(__file__).resolve().parent.parent
    files = ["conf/table/hifi_vtab.yaml", "conf/method/hifi.yaml", "conf/scorer/hifi.yaml", "peftbench/methods/hifi.py"]
    for name in files:
        text = (root / name).read_text()
        assert "Gui" in text and "Xiao" in text and "ACL 2023" in text and "Guo" not in text, name


def test_teleport_measurement_matches_the_method_and_the_readme_figure():
    """scripts/hifi_teleport.py on the packaged vit_micro (embedded/digits): its uniform-teleport heads are what
    method=hifi selects; a flat start vector changes none of the 18 choices, the information teleport 1."""
    import importlib.util
    from pathlib import Path

    from peftbench import score

    path = Path(__file__).resolve().parent.parent / "scripts" / "hifi_teleport.py"
    spec = importlib.util.spec_from_file_location("hifi_teleport", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = ["scoring.n_samples=32", "scoring.batch_size=32"]
    out = module.measure(small)
    assert (out["layers"], out["k"], out["choices"], out["n_samples"]) == (6, 3, 18, 32)
    selected = score.score(["method=hifi", "logger=none", *small])["state"]["heads"]
    assert out["heads"]["uniform"] == {path: list(h) for path, h in selected.items()}
    assert out["differ_from_uniform"] == {"uniform_flat_start": 0, "information": 1}
