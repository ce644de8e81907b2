"""Models beyond one-tensor classifiers: several inputs, keyword batches, user-run calibration loops, a part
of a model, quiet and pointed failures."""
import sys

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.testing.data import CountingData
from fxsparse.errors import CalibrationError, CaptureError, FxsparseError


class TwoImages(nn.Module):
    """Two inputs, like RAFT or a siamese network."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, image1, image2):
        return self.act(self.a(image1)) + self.act(self.b(image2))


def _pairs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)) for _ in range(n)]


def _exact_stats(model, pairs):
    """Per-channel population mean/std of each ReLU's input, computed directly."""
    xs = [torch.cat([model.a(p[0]) for p in pairs]), torch.cat([model.b(p[1]) for p in pairs])]
    return [(x.transpose(0, 1).reshape(4, -1).double().mean(1), x.transpose(0, 1).reshape(4, -1).double().std(1, unbiased=False))
            for x in xs]


def test_forward_loop_and_keyword_batches_give_the_exact_statistics():
    model, pairs = TwoImages().eval(), _pairs()

    def loop(m):
        for x, y in pairs:
            m(x, y)

    with torch.no_grad():
        want = _exact_stats(model, pairs)
    by_loop = fxsparse.sparsify(model, None, example_inputs=pairs[0], forward_loop=loop, alpha=0.0)
    by_dict = fxsparse.sparsify(model, [{"image1": x, "image2": y, "label": 0} for x, y in pairs], alpha=0.0)
    by_first_call = fxsparse.sparsify(model, None, forward_loop=loop, alpha=0.0)  # example inputs from call 1
    for gm in (by_loop, by_dict, by_first_call):
        ops = list(fxsparse.meansparse_ops(gm).values())
        assert len(ops) == 2
        for op, (mean, std) in zip(ops, want):
            torch.testing.assert_close(op.mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(op.std.double(), std, rtol=1e-5, atol=1e-6)
        x, y = pairs[1]
        assert torch.equal(gm(x, y), model(x, y))  # alpha 0: the original's output, bit for bit
        assert torch.equal(gm(image1=x, image2=y), model(x, y))


def test_calibrate_takes_a_forward_loop_and_counts_each_call_as_a_batch():
    model, pairs = TwoImages().eval(), _pairs(5)
    gm = fxsparse.prepare(model, pairs[0])
    calls = []

    def loop(m):
        assert not m.training and not torch.is_grad_enabled()
        for x, y in pairs:
            calls.append(1)
            m(image1=x, image2=y)

    fxsparse.calibrate(gm, forward_loop=loop, max_batches=2, measure=False)
    assert len(calls) == 3  # the third call is stopped before it runs
    assert all(int(op.count) == 2 * 4 * 8 * 8 for op in fxsparse.meansparse_ops(gm).values())
    with pytest.raises(CalibrationError, match="not both"):
        fxsparse.calibrate(gm, pairs, forward_loop=loop)
    with pytest.raises(CalibrationError, match="neither"):
        fxsparse.calibrate(gm)


def test_forward_loop_failures_name_the_batch_and_check_finiteness():
    model, pairs = TwoImages().eval(), _pairs()
    gm = fxsparse.prepare(model, pairs[0])

    def bad_shape(m):
        m(*pairs[0])
        m(torch.randn(4, 5, 8, 8), pairs[0][1])

    with pytest.raises(CalibrationError, match="calibration batch 1"):
        fxsparse.calibrate(gm, forward_loop=bad_shape)

    def nan(m):
        m(torch.full((4, 3, 8, 8), float("nan")), pairs[0][1])

    with pytest.raises(CalibrationError, match="non-finite"):
        fxsparse.calibrate(gm, forward_loop=nan)

    def broken(m):
        raise KeyError("my data")

    with pytest.raises(CalibrationError, match="forward_loop raised after 0 model call"):
        fxsparse.calibrate(gm, forward_loop=broken)


def test_tuple_batches_for_several_inputs_are_refused_with_the_fix():
    model, pairs = TwoImages().eval(), _pairs()
    with pytest.raises(CalibrationError, match="forward_loop"):
        fxsparse.sparsify(model, pairs)
    gm = fxsparse.prepare(model, pairs[0])
    for batch in (pairs, [pairs[0][0]]):
        with pytest.raises(CalibrationError, match=r"dict batches \{'image1'"):
            fxsparse.calibrate(gm, batch)
    with pytest.raises(CalibrationError, match="lacks the model input"):
        fxsparse.calibrate(gm, [{"image1": pairs[0][0]}])


class ListOfImages(nn.Module):
    """Takes a list of images, like torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, images):
        return [self.act(self.conv(i[None])) for i in images]


def test_list_inputs_read_from_input_target_pairs_and_a_misfit_is_named():
    model = ListOfImages().eval()
    imgs = [torch.rand(3, 8, 8) for _ in range(3)]
    gm = fxsparse.prepare(model, ([imgs[0]],))
    fxsparse.calibrate(gm, [([i], [{"boxes": None}]) for i in imgs])
    assert int(next(iter(fxsparse.meansparse_ops(gm).values())).count) == 3 * 36
    with pytest.raises(CalibrationError, match="saw a list of tensors"):
        fxsparse.calibrate(gm, [(imgs[0], 0)])


def test_sparsify_reads_the_data_once_for_example_inputs_and_calibration():
    data = CountingData([(torch.randn(4, 3, 8, 8), 0) for _ in range(3)])
    gm = fxsparse.sparsify(ListOfImagesFree(), data)
    assert data.iterations == 1  # one pass: example inputs, statistics and the audit's histogram estimate
    assert all(int(op.count) == 3 * 4 * 8 * 8 for op in fxsparse.meansparse_ops(gm).values())
    once = fxsparse.sparsify(ListOfImagesFree(), iter(data.batches))  # a one-shot iterator: one pass
    assert all(int(op.count) == 3 * 4 * 8 * 8 for op in fxsparse.meansparse_ops(once).values())


class ListOfImagesFree(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())


class Detectorish(nn.Module):
    """A backbone inside data-dependent code that no graph holds whole."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.GELU())
        self.backbone.out_channels = 8
        self.head = nn.Linear(8, 2)

    def forward(self, images):
        out = []
        for img in images:
            f = self.backbone(img[None]).mean((2, 3))
            if f.sum() > 0:  # data-dependent control flow
                out.append(self.head(f))
            else:
                out.append(-self.head(f))
        assert self.backbone.out_channels == 8
        return out


def test_submodule_is_sparsified_inside_a_copy_of_the_whole_model(tmp_path):
    model = Detectorish().eval()
    imgs = [torch.rand(3, 16, 16) for _ in range(4)]
    with pytest.raises(CaptureError) as info:
        fxsparse.prepare(model, ([imgs[0]],))
    assert "submodule=" in str(info.value) and "fxsparse.backend" in str(info.value)

    whole = fxsparse.sparsify(model, [([i], None) for i in imgs], alpha=0.0, submodule="backbone")
    assert isinstance(whole, Detectorish) and whole is not model
    assert isinstance(model.backbone, nn.Sequential)  # the user's model is untouched
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(imgs), whole(imgs)))
    records = fxsparse.audit(whole)
    assert [r.site for r in records] == ["backbone.2", "backbone.4"] and all(r.calibrated for r in records)
    assert records.to_dict()["capture"]["path"] == "fx"
    graph_sites = {d["site"] for _, d in records.to_networkx().nodes(data=True) if d.get("meansparse")}
    assert graph_sites == {"backbone.2", "backbone.4"}
    fxsparse.set_alpha(whole, 0.5)
    with torch.no_grad():
        changed = whole(imgs)
    assert not all(torch.equal(a, b) for a, b in zip(model(imgs), changed))
    with fxsparse.straight_through(whole):
        x = [imgs[0].clone().requires_grad_()]
        whole(x)[0].sum().backward()
        assert x[0].grad is not None
    fxsparse.save(whole, tmp_path / "part.fxs")
    loaded = fxsparse.load(model, tmp_path / "part.fxs")
    assert isinstance(loaded, Detectorish)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(changed, loaded(imgs)))
    fxsparse.calibrate(whole, forward_loop=lambda m: [m([i]) for i in imgs])  # recalibrating works on the copy

    with pytest.raises(FxsparseError, match="no submodule 'neck'"):
        fxsparse.prepare(model, ([imgs[0]],), submodule="neck")


def test_a_wrong_channel_count_prints_nothing_before_the_one_error(capfd):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    capfd.readouterr()
    with pytest.raises(CaptureError, match="3 channels") as info:
        fxsparse.prepare(model, torch.randn(2, 5, 32, 32))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert info.value.__cause__ is not None  # torch's error, for whoever wants the detail


def test_debug_flag_lets_torch_output_through(capfd, monkeypatch):
    monkeypatch.setenv("FXSPARSE_DEBUG", "1")
    from fxsparse import config
    from fxsparse.capture import quiet

    assert config.is_debug()
    with quiet():
        print("seen")
    assert "seen" in capfd.readouterr().out
    monkeypatch.setenv("FXSPARSE_DEBUG", "0")
    with quiet():
        print("hidden")
    assert capfd.readouterr().out == ""


class FixedSize(nn.Module):
    """Exported (FX cannot trace the branch on a shape), and fixed to its input size by a flatten into Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        y = self.act(self.conv(x))
        if x.shape[-1] > 1:  # FX cannot branch on a shape; export can
            y = y * 1
        return self.fc(y.flatten(1))


class AnySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x, labels=None):
        y = self.act(self.conv(x)).mean((2, 3))
        if x.shape[-1] > 1:  # FX cannot branch on a shape; export can
            y = y * 1
        if labels is not None:
            return y, nn.functional.cross_entropy(y, labels)
        return y


def _export_records_guards() -> bool:
    """Whether this torch's exported modules carry the guard function fxsparse checks inputs against (torch
    2.5 and 2.6 do not: a size the graph cannot take then gets torch's own RuntimeError)."""
    program = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),), strict=False)
    return hasattr(program.module(), "_guards_fn")


@pytest.mark.skipif(not _export_records_guards(), reason="this torch's exported modules have no _guards_fn")
def test_exported_graphs_take_other_sizes_where_the_model_allows():
    model = AnySize().eval()
    gm = fxsparse.prepare(model, torch.randn(2, 3, 8, 8))
    assert gm.meta["fxsparse_capture"].path == "export"
    x = torch.randn(3, 3, 12, 10)
    assert torch.equal(gm(x), model(x))

    fixed = fxsparse.prepare(FixedSize().eval(), torch.randn(2, 3, 8, 8))
    assert fixed.meta["fxsparse_capture"].path == "export"
    with pytest.raises(FxsparseError, match=r"captured the model on \[\(2, 3, 8, 8\)\]"):
        fixed(torch.randn(2, 3, 12, 12))


@pytest.mark.skipif(not _export_records_guards(), reason="this torch's exported modules have no _guards_fn")
def test_dynamic_height_and_width_over_the_time_budget_are_given_up_and_said(monkeypatch):
    """MobileViTv2 made export spend minutes on symbolic height and width: past the budget capture exports
    with a dynamic batch only, records why, and a refused size names it."""
    monkeypatch.setenv("FXSPARSE_SPATIAL_EXPORT_BUDGET", "1e-6")  # read at call time (fxsparse/config.py)
    model = AnySize().eval()
    gm = fxsparse.prepare(model, torch.randn(2, 3, 8, 8))
    report = gm.meta["fxsparse_capture"]
    assert report.path == "export" and "FXSPARSE_SPATIAL_EXPORT_BUDGET" in report.reasons["dynamic_shapes"]
    x = torch.randn(5, 3, 8, 8)  # the batch stays free
    assert torch.equal(gm(x), model(x))
    with pytest.raises(FxsparseError, match="fxsparse fixed them"):
        gm(torch.randn(2, 3, 12, 10))


def test_keyword_arguments_reach_the_graph_or_are_refused_by_name():
    model = AnySize().eval()
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    gm = fxsparse.prepare(model, x)
    with pytest.raises(FxsparseError, match="labels"):
        gm(x, labels=labels)
    with_labels = fxsparse.prepare(model, {"x": x, "labels": labels})
    out, loss = with_labels(x, labels=labels)
    want_out, want_loss = model(x, labels)
    assert torch.equal(out, want_out) and torch.equal(loss, want_loss)
    fxsparse.calibrate(with_labels, [{"x": x, "labels": labels, "id": 7}])


def test_forward_loop_calibration_resumes_from_a_checkpoint(tmp_path):
    model, pairs = TwoImages().eval(), _pairs(7)
    reference = fxsparse.calibrate(fxsparse.prepare(model, pairs[0]), forward_loop=lambda m: [m(*p) for p in pairs])

    def interrupted(m):
        for i, p in enumerate(pairs):
            if i == 5:
                raise KeyError("the loader died")
            m(*p)

    path = tmp_path / "calibration.ckpt"
    with pytest.raises(CalibrationError, match="after 5 model call"):
        fxsparse.calibrate(fxsparse.prepare(model, pairs[0]), forward_loop=interrupted, checkpoint=path,
                           checkpoint_every=2)
    resumed = fxsparse.prepare(model, pairs[0])
    fxsparse.calibrate(resumed, forward_loop=lambda m: [m(*p) for p in pairs], checkpoint=path, checkpoint_every=2)
    for a, b in zip(fxsparse.meansparse_ops(reference).values(), fxsparse.meansparse_ops(resumed).values()):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std) and torch.equal(a.count, b.count)
        assert torch.equal(a.zscore_counts, b.zscore_counts)


class ListExported(ListOfImages):
    def forward(self, images):
        if images[0].shape[-1] > 1:  # FX cannot index a Proxy list's shape; export takes lists
            return torch.cat([self.act(self.conv(i[None])) for i in images])
        return images[0]


def test_list_inputs_are_exported_with_dynamic_sizes():
    model = ListExported().eval()
    gm = fxsparse.prepare(model, ([torch.rand(3, 8, 8), torch.rand(3, 8, 8)],))
    assert gm.meta["fxsparse_capture"].path == "export"
    other = [torch.rand(3, 10, 12), torch.rand(3, 10, 12)]
    assert torch.equal(gm(other), model(other))


def test_save_and_load_keep_several_and_keyword_inputs(tmp_path):
    model, pairs = TwoImages().eval(), _pairs()
    two = fxsparse.sparsify(model, [{"image1": x, "image2": y} for x, y in pairs], alpha=0.3)
    fxsparse.save(two, tmp_path / "two.fxs")
    again = fxsparse.load(model, tmp_path / "two.fxs")
    assert torch.equal(again(*pairs[0]), two(*pairs[0]))

    labelled = AnySize().eval()
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    gm = fxsparse.sparsify(labelled, None, example_inputs={"x": x, "labels": labels},
                           forward_loop=lambda m: m(x=x, labels=labels), alpha=0.3)
    fxsparse.save(gm, tmp_path / "kw.fxs")
    loaded = fxsparse.load(labelled, tmp_path / "kw.fxs")
    assert all(torch.equal(a, b) for a, b in zip(loaded(x=x, labels=labels), gm(x=x, labels=labels)))


def test_the_export_time_limit_stops_its_body_and_keeps_an_outer_timer():
    import signal
    import time

    limit = sys.modules["fxsparse.capture.export"]._time_limit
    overtime = sys.modules["fxsparse.capture.export"]._Overtime
    outer = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        with pytest.raises(overtime):
            with limit(0.05):
                time.sleep(5)
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 90 < left < 100 and signal.getsignal(signal.SIGALRM) is outer
        with limit(30):  # a body well within its budget costs the outer timer only its own time
            pass
        assert signal.getitimer(signal.ITIMER_REAL)[0] > left - 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
