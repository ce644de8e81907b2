"""Every bad input gets a specific fxsparse error (or warning) that says what to do; the user's model survives."""
import re
import warnings

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.testing.bad_inputs import BAD_INPUTS, X, small_model


def _snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "types": [type(m) for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _same(before, after) -> bool:
    return (before["modes"] == after["modes"] and before["types"] == after["types"]
            and before["hooks"] == after["hooks"] and before["state"].keys() == after["state"].keys()
            and all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"]))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.what for c in BAD_INPUTS])
def test_bad_input_gets_a_specific_message_and_leaves_the_model_alone(case, tmp_path):
    model = small_model()
    before = _snapshot(model)
    if issubclass(case.expect, Warning):
        with pytest.warns(case.expect) as record:
            gm = case.run(model, str(tmp_path))
        message = str(next(r.message for r in record if isinstance(r.message, case.expect)))
        if isinstance(gm, nn.Module):  # a warning that leaves the model as it was (no site)
            assert not fxsparse.meansparse_ops(gm)
    else:
        with pytest.raises(Exception) as info:
            case.run(model, str(tmp_path))
        assert type(info.value) is case.expect, f"{type(info.value).__name__}: {info.value}"
        assert isinstance(info.value, fxsparse.FxsparseError) and isinstance(info.value, case.builtin)
        message = str(info.value)
    assert FIX.search(message), f"the message does not say what to do: {message}"
    assert _same(before, _snapshot(model))


# a message names what to do: an instruction, the values allowed, or a question that points to the fix
FIX = re.compile(r"\b(pass|give|use|run|call|install|set|put|check|write|delete|calibrate|evaluate|upgrade|"
                 r"exclude|convert|clean|build|load|choose|divide|lists|see|did you mean|known|must|needs)\b", re.IGNORECASE)


def test_the_fix_check_rejects_a_bare_message():
    assert not FIX.search("list index out of range")
    assert not FIX.search("something went wrong in layer conv")


def test_failing_batch_names_the_layer_and_what_prepare_saw():
    gm = fxsparse.prepare(small_model(), X)
    with pytest.raises(fxsparse.CalibrationError) as info:
        fxsparse.calibrate(gm, [X, torch.randn(2, 5, 6, 6)])
    message = str(info.value)
    assert "batch 1" in message and "layer 'conv' (Conv2d)" in message
    assert "(2, 5, 6, 6) float32" in message and "prepare saw inputs [(4, 3, 6, 6) float32]" in message


def test_non_finite_values_name_site_batch_and_source():
    gm = fxsparse.prepare(small_model(), X)
    nan = X.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxsparse.CalibrationError, match=r"site\(s\) \['act', 'act2'\] in calibration batch 1.*"
                                                        "batch itself holds NaN"):
        fxsparse.calibrate(gm, [X, nan])
    big = nn.Linear(6, 6)
    with torch.no_grad():
        big.weight.fill_(1e30)
    with pytest.raises(fxsparse.CalibrationError, match=r"site\(s\) \['1'\] in calibration batch 0.*model overflows"):
        fxsparse.calibrate(fxsparse.prepare(nn.Sequential(big, nn.ReLU()), X), [X * 1e10])


def test_site_channel_mismatch_names_the_site():
    gm = fxsparse.prepare(nn.Sequential(nn.ReLU()), X)
    with pytest.raises(fxsparse.CalibrationError, match="batch 0: site '0' expects 3 channels along dim 1, but its "
                                                        r"input has shape \(2, 7, 6, 6\)"):
        fxsparse.calibrate(gm, [torch.randn(2, 7, 6, 6)])


def test_capture_failure_names_the_model_and_each_path():
    from fxsparse.testing.bad_inputs import DataDependent

    with pytest.raises(fxsparse.CaptureError) as info:
        fxsparse.prepare(DataDependent(), X)
    message = str(info.value)
    assert "DataDependent" in message and "fx:" in message and "export:" in message


def test_model_without_activation_warns_and_stays_usable():
    """The choice: a model with nothing to sparsify is not an error. prepare and sparsify warn and return the
    captured model unchanged; calibrate and set_alpha on it warn and do nothing; save/load round-trip it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 3)
    with pytest.warns(fxsparse.NoActivationWarning, match="Sequential has no activation"):
        gm = fxsparse.sparsify(model, [x], alpha=0.3)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.warns(fxsparse.NoActivationWarning, match="nothing to calibrate"):
        fxsparse.calibrate(gm, [x])
    with pytest.warns(fxsparse.NoActivationWarning, match="alpha changes nothing"):
        fxsparse.set_alpha(gm, 0.2)
    with pytest.raises(fxsparse.SelectionError, match="no site named"):
        fxsparse.set_alpha(gm, {"0": 0.2})
    assert len(fxsparse.audit(gm)) == 0


def test_no_warning_when_there_are_sites():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsparse.NoActivationWarning)
        fxsparse.sparsify(small_model(), [X], alpha=0.1)


def test_every_error_class_is_an_fxsparse_error_and_the_builtin_of_its_cause():
    from fxsparse import errors

    builtin = {"FxsparseValueError": ValueError, "FxsparseTypeError": TypeError, "CaptureError": RuntimeError,
               "CalibrationError": ValueError, "SelectionError": ValueError, "PersistenceError": ValueError,
               "InputRangeError": ValueError, "BackendError": RuntimeError, "MissingDependencyError": ImportError,
               "DistributedError": RuntimeError}
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, Exception) and cls is not errors.FxsparseError
               and not issubclass(cls, Warning)}
    assert set(classes) == set(builtin)
    for name, cls in classes.items():
        assert issubclass(cls, fxsparse.FxsparseError) and issubclass(cls, builtin[name]), name
        assert getattr(fxsparse, name) is cls  # exported
    assert issubclass(fxsparse.NoActivationWarning, UserWarning)


def test_backend_skips_a_graph_without_inputs_or_sites_and_raises_its_own_errors():
    """A graph break can leave Dynamo a graph with no input and no activation (here: a constant computed
    before the break); the backend hands it to the compiler unchanged. Errors reach the caller unwrapped."""

    class ConstantFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 1), nn.ReLU()

        def forward(self, x):
            offset = torch.arange(4.0).view(1, 4, 1, 1) * 2
            torch._dynamo.graph_break()
            return self.act(self.conv(x)) + offset

    model = ConstantFirst().eval()
    x = torch.randn(2, 3, 5, 5)
    torch._dynamo.reset()
    calib = fxsparse.backend()
    torch.compile(model, backend=calib)(x)
    torch._dynamo.reset()
    gm = fxsparse.sparsify(model, [x], alpha=0.3)
    fast = torch.compile(model, backend=fxsparse.backend(calib.statistics(), alpha=0.3, compiler="eager"))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), gm(x))
    torch._dynamo.reset()
    broken = torch.compile(model, backend=fxsparse.backend({}, alpha=0.3, compiler="eager"))
    with pytest.raises(fxsparse.SelectionError, match="no statistics for site 'act'"):
        broken(x)
    torch._dynamo.reset()


def test_verify_runs_in_eval_mode_and_restores_the_mode():
    from fxsparse.tools.coverage import verify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5)).train()
    model[3].eval()  # mixed modes survive too
    stats = {k: v.clone() for k, v in model[1].state_dict().items()}
    result = verify(model, (torch.randn(4, 3, 8, 8) * 3 + 1,))
    assert result.exact  # eval-mode graph vs eval-mode model
    assert all(torch.equal(stats[k], v) for k, v in model[1].state_dict().items())  # running stats unchanged
    assert [m.training for m in model.modules()] == [True, True, True, True, False]


def test_a_failing_compiler_behind_the_backend_reaches_the_user_as_a_backend_error():
    """Dynamo wraps what a backend raises in BackendCompilerFailed; ours comes out as itself, at the call."""

    def broken_compiler(gm, example_inputs):
        raise RuntimeError("the compiler behind is broken")

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 5, 5)
    gm = fxsparse.sparsify(model, [x], alpha=0.2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxsparse.backend(fxsparse.statistics(gm), alpha=0.2,
                                                             compiler=broken_compiler))
    with pytest.raises(fxsparse.BackendError, match="compiler behind is broken") as info:
        compiled(x)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, RuntimeError)
    torch._dynamo.reset()


def test_evaluate_warns_at_chance_and_not_when_the_model_is_right():
    from fxsparse.testing.bad_inputs import IMAGES, Y

    model = small_model().eval()
    with pytest.warns(fxsparse.ChanceAccuracyWarning, match="random weights.*preprocessing.*labels"):
        fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, attacks=["clean"])
    with torch.no_grad():
        right = model(IMAGES).argmax(1)  # labels the model gets right: 100% clean
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxsparse.ChanceAccuracyWarning)
        fxsparse.evaluate(model, (IMAGES, right), eps=0.1, attacks=["clean", "pgd:steps=1"])
        fxsparse.evaluate(model, (IMAGES, Y), eps=0.1, attacks=["pgd:steps=1"])  # no clean row: no claim


def test_chance_threshold_is_chance_plus_noise():
    from fxsparse.robust.guards import chance_noise

    assert chance_noise(10, 40) == pytest.approx(0.1 + 2 * (0.09 / 40) ** 0.5)
    assert chance_noise(1000, 50_000) < 0.0013  # ImageNet: a trained model is far above it


def test_a_generator_of_batches_is_read_once():
    from fxsparse.testing.bad_inputs import IMAGES, Y

    reads = []

    def batches():
        for i in range(0, 4, 2):
            reads.append(i)
            yield IMAGES[i:i + 2], Y[i:i + 2]

    report = fxsparse.evaluate(small_model().eval(), batches(), eps=0.1, attacks=["clean", "pgd:steps=1"])
    assert report.n == 4 and reads == [0, 2]
    reads.clear()
    report = fxsparse.evaluate(small_model().eval(), batches(), eps=0.1, attacks=["clean"], max_examples=2)
    assert report.n == 2 and reads == [0]  # stops at max_examples: the rest is never read


def _one_of_two_ranks(monkeypatch):
    """Pretend to be rank 1 of 2, recording what this rank tells the others through failing_together."""
    from fxsparse.calibrate import distributed

    told = []
    monkeypatch.setattr(distributed, "rank_and_size", lambda: (1, 2))
    monkeypatch.setattr(distributed, "_failed_ranks", lambda failed: told.append(failed) or [])
    monkeypatch.setattr(distributed, "sum_across_ranks", lambda n: n)
    return told


def test_a_data_check_failing_on_one_rank_tells_the_others(monkeypatch):
    from fxsparse.robust.guards import check_evaluation_data, validation_batches
    from fxsparse.testing.bad_inputs import IMAGES, Y

    told = _one_of_two_ranks(monkeypatch)
    model = small_model().eval()
    with pytest.raises(fxsparse.FxsparseValueError, match="labels in"):
        check_evaluation_data(model, model, (IMAGES, Y + 5), batch_size=2, max_examples=None, heldout=None,
                              device="cpu")
    assert told == [True]  # the other ranks raise DistributedError instead of waiting
    data, classes = check_evaluation_data(model, model, (IMAGES, Y), batch_size=2, max_examples=None,
                                          heldout=None, device="cpu")
    assert told == [True, False] and classes == 5
    with pytest.raises(fxsparse.FxsparseTypeError):
        validation_batches(["not a batch"], 2, None)
    assert told == [True, False, True]
    with pytest.raises(fxsparse.FxsparseValueError, match="validation data is empty"):
        validation_batches([], 2, None)  # every rank's shard empty (summed across ranks): raised on every rank


@pytest.mark.slow
def test_fx_captured_vit_at_another_size_is_our_error():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    gm = fxsparse.prepare(model, torch.rand(2, 3, 32, 32), capture="fx")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    with pytest.raises(fxsparse.FxsparseValueError, match=r"\(2, 3, 32, 32\).*dynamic_img_size=True") as info:
        gm(torch.rand(2, 3, 48, 48))
    assert "Proxy" not in str(info.value) and "(2, 3, 48, 48)" in str(info.value)
    free = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, dynamic_img_size=True).eval()
    assert fxsparse.prepare(free, x, capture="fx")(torch.rand(2, 3, 48, 48)).shape == (2, 1000)  # the fix named


def test_a_checkpoint_refused_on_one_rank_tells_the_others(monkeypatch, tmp_path):
    """Each rank reads its own resume file: one that does not fit must fail every rank, not leave the others
    waiting in the first collective (evaluate and search_alpha)."""
    from fxsparse.files.resume import ResumeFile
    from fxsparse.testing.bad_inputs import IMAGES, Y

    path = tmp_path / "run.ckpt"
    ResumeFile(path, "calibration", {}).save({}, {})  # another kind of run's file
    gm = fxsparse.sparsify(small_model().eval(), [IMAGES], alpha=0.0, progress=False)
    told = _one_of_two_ranks(monkeypatch)
    with pytest.raises(fxsparse.PersistenceError, match="not an evaluation checkpoint"):
        fxsparse.evaluate(gm, (IMAGES, Y), eps=0.1, attacks=["clean"], checkpoint=path)
    assert told[-1] is True
    told.clear()
    with pytest.raises(fxsparse.PersistenceError, match="not an alpha search checkpoint"):
        fxsparse.search_alpha(gm, (IMAGES, Y), eps=0.1, attack="pgd:steps=1", alphas=(0.1,), checkpoint=path)
    assert told[-1] is True
