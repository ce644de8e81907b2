"""The command line and the demo (with a tiny training budget)."""
import json

import pytest
import torch

from fxsparse.tools import demo
from fxsparse.tools.cli import main
from fxsparse.tools.zoo import resolve


def test_audit_markdown_on_meta_device(capsys):
    assert main(["audit", "efficientnet_b0"]) == 0
    out = capsys.readouterr().out
    assert "random init" in out and "meta device" in out
    assert "| bn1.act | silu |" in out and "49 sites" in out


def test_audit_json_with_selection_and_noise_calibration(capsys):
    args = ["audit", "torchvision:resnet18", "--format", "json", "--input-size", "3", "32", "32",
            "--exclude", "layer4.*", "--calibrate", "1", "--alpha", "0.1"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    sites = [s["site"] for s in doc["sites"]]
    assert len(sites) == 13 and not any(s.startswith("layer4") for s in sites)
    assert all(s["calibrated"] and s["alpha"] == pytest.approx(0.1) for s in doc["sites"])


def test_audit_unknown_model_is_a_clean_error(capsys):
    assert main(["audit", "resnet18_but_not_really"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_resolve_names():
    assert resolve("resnet18") == ("timm", "resnet18")
    assert resolve("torchvision:resnet18") == ("torchvision", "resnet18")
    assert resolve("mobilenet_v3_small") == ("torchvision", "mobilenet_v3_small")


def test_digits_splits_are_disjoint_and_stratified():
    splits = demo.load_digits_splits(0)
    sizes = {k: len(v[0]) for k, v in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] > sizes["val"] > 0
    keys = {k: {tuple(img.flatten().tolist()) + (int(lbl),) for img, lbl in zip(*v)} for k, v in splits.items()}
    # the digits data set has a few exact duplicate images; splits of distinct indices may share those only
    assert len(keys["train"] & keys["test"]) < 10
    for split in splits.values():
        assert set(split[1].tolist()) == set(range(10))


@pytest.mark.slow
def test_demo_runs_end_to_end_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE", str(tmp_path))
    config = dict(demo.CONFIG, epochs=2, eval_steps=3, width=8)
    lines = []
    result = demo.run(config=config, alphas=(0.0, 0.2), log=lines.append, attack="apgd-ce:steps=5")
    text = "\n".join(lines)
    assert "BPDA" in text and "adaptive worst case" in text and "| original |" in text and "| sparsified (chosen) |" in text
    assert "| sparsified (alpha forced," in text and "what the operator does" in text  # the operator at work
    search = result["search"]
    assert search.attack == "apgd-ce:steps=5" and search.score == "adaptive"  # the library's default score
    # a two-point grid: the rule picks 0.2 exactly when its gain over 0 is beyond noise, else 0
    assert result["alpha"] == (0.0 if search.verdict == "no detectable gain" else 0.2) == search.alpha
    assert f"search verdict: {search.verdict_line()}" in text and "McNemar p" in text
    for row in result["test"].values():
        assert set(row) == {"clean", "pgd", "bpda", "worst"} and all(0 <= v <= 1 for v in row.values())
        assert row["worst"] <= min(row["pgd"], row["bpda"])  # the worst case covers every attack and column
    assert list(tmp_path.glob("demo-digits-cnn-*.pt"))
    lines.clear()
    demo.trained_model(demo.load_digits_splits(config["seed"]), config, log=lines.append)
    assert any("loaded the adversarially trained CNN" in line for line in lines)


def test_pgd_lowers_accuracy_and_respects_the_budget():
    from fxsparse.robust.attacks import pgd

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(64, 1, 4, 4)
    y = model(x).argmax(1)
    for norm, eps in (("linf", 0.3), ("l2", 1.0)):
        adv = pgd(model, x, y, eps, steps=10, norm=norm, restarts=2)
        delta = (adv - x).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
        assert (model(adv).argmax(1) == y).float().mean() < 1.0
        assert torch.equal(adv, pgd(model, x, y, eps, steps=10, norm=norm, restarts=2))  # seeded
