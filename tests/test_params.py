"""``python -m peftbench.params`` never touches the network: local weights or random ones, data on disk or synthetic."""

from __future__ import annotations

import json

import pytest

from peftbench.params import main


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import huggingface_hub
    import timm.models._hub as timm_hub

    def refuse(*args, **kwargs):
        raise AssertionError("peftbench.params tried to download something")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)  # offline-ok: makes any download fail
    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse, raising=False)  # offline-ok
    monkeypatch.setattr(timm_hub, "download_cached_file", refuse, raising=False)


def test_a_scorer_method_without_weights_or_data_scores_random_weights_on_synthetic_batches(
    tmp_path, capsys, no_network
):
    args = ["method=gps", "dataset=vtab/dtd", f"paths.data_dir={tmp_path}",
            "backbone.pretrained=true", "backbone.timm_name=vit_tiny_patch16_224",  # offline-ok: refused
            "++backbone.patch_size=8",
            "++backbone.depth=2", "scoring.n_samples=8", "scoring.batch_size=4"]  # a hub model: no local weights
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"].startswith("random") and report["scoring_data"].startswith("synthetic: 8 random images")
    assert report["trainable_backbone"] > 0


def test_a_hub_backbone_is_never_downloaded(capsys, no_network):
    assert main(["method=lora", "backbone=vit_b16_in21k", "dataset=vtab/cifar"]) == 0  # the hub weights are not local
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_backbone"] == 294_912 and report["pretrained_backbone"] == 85_798_656


def test_packaged_weights_and_embedded_data_are_used_when_there(capsys, no_network):
    assert main(["method=spt_lora", "scoring.n_samples=16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "local: vit_micro.safetensors" and "on disk" in report["scoring_data"]


def test_a_bad_option_is_one_line(capsys):
    assert main(["method=nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftbench: error:") and "\n" not in err and "nope" in err
