"""`fxsparse evaluate`: files in, two tables (or JSON) out; the digits run from the README (slow)."""
import json

import pytest
import torch

from fxsparse.tools.cli import main

from fxsparse.testing.markers import needs_reference_attacks


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    paths = {}
    for name, n in (("train", 16), ("val", 12), ("test", 12)):
        x = torch.rand(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        paths[name] = str(root / f"{name}.pt")
        torch.save((x, y) if name != "val" else {"x": x, "y": y}, paths[name])
    return paths


def test_evaluate_markdown(files, capsys):
    rc = main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--calibration", files["train"],
               "--data", files["test"], "--attacks", "clean", "pgd:steps=2", "--alpha", "0.3", "--eps", "0.03"])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "## original model, alpha = 0 (no operators)" in out and "## sparsified model, alpha = 0.3" in out
    assert out.count("BPDA (straight-through)") == 2 and "| pgd (steps=2) |" in out
    assert "| pgd (steps=2) | bpda |" in out and "McNemar p" in out  # the paired before/after verdict
    assert "normalisation inside the model (mean (0.5, 0.5, 0.5)" in captured.err  # test_resnet's pretrained_cfg


def test_evaluate_json_with_search_and_placement(files, capsys):
    rc = main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--calibration", files["train"],
               "--validation", files["val"], "--data", files["test"], "--attacks", "clean", "pgd:steps=1",
               "--search", "--search-attack", "pgd:steps=1", "--alphas", "0", "0.5", "--max-clean-drop", "1",
               "--placement", "residual", "--format", "json", "--no-baseline"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"sparsified", "alpha", "placement", "search", "search_verdict", "processes"}
    verdict = doc["search_verdict"]
    assert verdict["verdict"] in ("no detectable gain", "gain beyond noise") and "McNemar" in verdict["rule"]
    assert doc["alpha"] == (0.0 if verdict["verdict"] == "no detectable gain" else 0.5)  # 2-point grid: exact
    assert doc["placement"] == ["residual"] and len(doc["search"]) == 2
    assert all(len(t["robust_interval"]) == 2 for t in doc["search"])
    assert doc["sparsified"]["n"] == 12 and doc["sparsified"]["attacks"][1]["attack"] == "pgd"


def test_evaluate_errors(files, tmp_path, capsys):
    assert main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--data", files["test"]]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"images": torch.rand(2, 3, 8, 8)}, bad)
    assert main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--calibration", str(bad),
                 "--data", files["test"]]) == 2
    assert "must hold (x, y) tensors" in capsys.readouterr().err
    assert main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--calibration", files["train"],
                 "--data", files["test"], "--attacks", "cw"]) == 2
    assert "unknown attack" in capsys.readouterr().err


def test_evaluate_refuses_pixels_and_budgets_in_the_wrong_units(files, tmp_path, capsys):
    x, y = torch.load(files["test"])
    pixels = tmp_path / "pixels.pt"
    torch.save((x * 255, y), pixels)
    base = ["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights", "--calibration", files["train"],
            "--attacks", "clean"]
    assert main(base + ["--data", str(pixels)]) == 2
    assert "divide the images by 255" in capsys.readouterr().err
    assert main(base + ["--data", files["test"], "--eps", "8"]) == 2
    assert "Did you mean 8/255" in capsys.readouterr().err



def test_evaluate_refuses_random_weights_unless_told(files, capsys):
    args = ["evaluate", "timm:test_resnet", "--pretrained", "never", "--calibration", files["train"],
            "--data", files["test"], "--attacks", "clean"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "random init" in err and "--allow-random-weights" in err and "--data digits" not in err


def test_evaluate_refuses_data_the_model_cannot_read(files, tmp_path, capsys):
    gray = tmp_path / "gray.pt"
    torch.save((torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))), gray)
    assert main(["evaluate", "timm:test_resnet", "--pretrained", "never", "--allow-random-weights",
                 "--calibration", files["train"], "--data", str(gray), "--attacks", "clean", "pgd:steps=1"]) == 2
    assert "1 channel(s)" in capsys.readouterr().err

@needs_reference_attacks
@pytest.mark.slow
def test_evaluate_digits_from_the_readme(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FXSPARSE_CACHE", str(tmp_path))
    rc = main(["evaluate", "digits", "--epochs", "2", "--width", "8", "--search", "--alphas", "0", "0.2",
               "--attacks", "clean", "pgd:steps=3", "square:queries=20", "--max-examples", "60"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "## alpha search on the validation split" in out and "179 validation examples" in out
    assert "60 examples" in out and "| square (queries=20) |" in out


def _options():
    from fxsparse.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return [(name, action) for name, parser in sub.choices.items() for action in parser._actions
            if action.option_strings and action.dest != "help"]


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_cli_option_has_help_that_matches_the_code():
    import re

    from fxsparse.robust.evaluation import MODE_TITLES
    from fxsparse.robust.search import SCORES, DEFAULT_SCORE

    for command, action in _options():
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        stated = re.search(r"\(default:? ([^)]+)\)", action.help)
        if stated and action.default not in (None, False):
            assert _shown(action.default) in stated.group(1), (command, action.option_strings, action.help)
    search_attack = dict((a.dest, a) for c, a in _options() if c == "evaluate")["search_attack"]
    assert "BPDA mode" not in search_attack.help and "every column" in search_attack.help
    assert SCORES[DEFAULT_SCORE] == tuple(MODE_TITLES)  # what "every column" says: the search scores them all
