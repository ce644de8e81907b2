"""Conventions other tools use, accepted as they spell them."""
import pytest
import torch

import fxsparse
from fxsparse.robust.attacks import pgd
from fxsparse.testing.bad_inputs import IMAGES, Y, small_model
from fxsparse.testing.markers import needs_reference_attacks


@pytest.mark.parametrize("spelling, norm", [("Linf", "linf"), ("L2", "l2"), ("LINF", "linf")])
def test_norm_as_autoattack_spells_it(spelling, norm):
    model = small_model().eval()
    report = fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, norm=spelling, attacks=["clean", "pgd:steps=1"])
    assert report.norm == norm
    same = fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, norm=norm, attacks=["clean", "pgd:steps=1"])
    assert report["pgd"].plain == same["pgd"].plain
    assert torch.equal(pgd(model, IMAGES, Y, 0.1, norm=spelling, steps=1), pgd(model, IMAGES, Y, 0.1, norm=norm, steps=1))


def _git_autoattack(calls):
    """A stand-in for the original repository's `autoattack` package (what RobustBench imports): the same attack
    modules, and its AutoAttack's API (`verbose=`, `run_standard_evaluation(x, y, bs=)` returning x_adv)."""
    import types

    from pyautoattack import autopgd_base, square

    class AutoAttack:
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            calls.append(dict(norm=norm, eps=eps, seed=seed, verbose=verbose, version=version))

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
            calls.append(dict(bs=bs))
            return x_orig.clone()

    package = types.ModuleType("autoattack")
    package.AutoAttack = AutoAttack
    package.autopgd_base, package.square = autopgd_base, square
    return package


@needs_reference_attacks
def test_the_git_autoattack_package_is_used_where_pyautoattack_is_absent(monkeypatch):
    import sys

    from fxsparse.robust import attacks
    from fxsparse.robust.search import default_attack

    calls = []
    package = _git_autoattack(calls)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", package)
    monkeypatch.setitem(sys.modules, "autoattack.autopgd_base", package.autopgd_base)
    monkeypatch.setitem(sys.modules, "autoattack.square", package.square)
    assert attacks.reference_package() is package and default_attack() == "apgd-ce"
    model = small_model().eval()
    adv = attacks.apgd(model, IMAGES, Y, 0.1, steps=2)
    assert adv.shape == IMAGES.shape and float((adv - IMAGES).abs().max()) <= 0.1 + 1e-6
    assert torch.equal(attacks.autoattack(model, IMAGES, Y, 0.1, seed=3), IMAGES)
    assert calls == [dict(norm="Linf", eps=0.1, seed=3, verbose=False, version="standard"), dict(bs=4)]


def test_the_fallback_score_attack_says_so_and_the_result_records_it(monkeypatch):
    import sys
    import warnings

    from fxsparse.robust import search
    from fxsparse.testing.bad_inputs import X

    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)
    assert search.default_attack() == search.FALLBACK_ATTACK
    monkeypatch.setattr(search, "FALLBACK_ATTACK", "pgd:steps=1")  # a cheap fallback, for the test's time
    FALLBACK_ATTACK = search.FALLBACK_ATTACK
    gm = fxsparse.prepare(small_model(), X)
    fxsparse.calibrate(gm, [X])
    with pytest.warns(fxsparse.ScoreAttackWarning, match=r"fallback attack 'pgd:.*fxsparse\[eval\]"):
        warnings.simplefilter("ignore", fxsparse.SearchWarning)  # no gain on 4 examples: not the point here
        result = fxsparse.search_alpha(gm, (IMAGES, Y), eps=0.05, alphas=(0.0,), score="plain",
                                       progress=False)
    assert result.attack == FALLBACK_ATTACK and f"score: {FALLBACK_ATTACK}" in result.to_markdown()


def test_an_explicit_score_attack_does_not_warn():
    import warnings

    from fxsparse.robust.guards import score_attack

    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsparse.ScoreAttackWarning)
        assert score_attack("apgd-ce") == "apgd-ce"
    with pytest.warns(fxsparse.ScoreAttackWarning):
        score_attack("pgd:steps=50")


def test_progress_bars_show_in_a_terminal_or_a_notebook_unless_told(monkeypatch):
    import sys
    import types

    from fxsparse import util

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not util.in_notebook() and not util.show_progress(None)
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})  # what a Jupyter kernel's shell carries
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert util.in_notebook() and util.show_progress(None) and not util.show_progress(False)
    terminal = types.SimpleNamespace(config={"TerminalIPythonApp": {}})  # IPython in a terminal: no kernel
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: terminal))
    assert not util.in_notebook() and util.show_progress(True)
