"""Bad inputs to every public entry point, each with the error (or warning) class it must get.

Shared by tests/test_errors.py (which also checks that the user's model survives every one unchanged) and
benchmarks/bad_inputs.py (which prints the table of messages for benchmarks/RESULTS.md). Every case is a
function of the user's model (`small_model()`) and a scratch folder.
"""
import dataclasses
import os
from typing import Callable

import torch
from torch import nn

import fxsparse
from fxsparse.robust.attacks import pgd

X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))  # seeded: the bad-input table is reproducible
IMAGES = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # in [0, 1], for the attacks
Y = torch.tensor([0, 1, 2, 3])


class Small(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(width, 5)
        self.act2 = nn.GELU()

    def forward(self, x):
        x = self.act(self.conv(x))
        return self.act2(self.fc(x.mean((2, 3))))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return Small().train()  # training mode on purpose: fxsparse must not switch the user's model to eval


class DataDependent(nn.Module):
    """Neither FX nor torch.export can capture a branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if y.sum() > 0 else y


@dataclasses.dataclass
class BadInput:
    """`expect` is the exact class raised (or warned); `builtin` the builtin it must also be (ValueError for
    a wrong value, TypeError for a wrong type, ...), so callers that catch builtins catch it."""

    what: str
    run: Callable[[nn.Module, str], object]
    expect: type
    builtin: type = ValueError


def _prepared(model):
    return fxsparse.prepare(model, X)


def _calibrated(model):
    gm = _prepared(model)
    fxsparse.calibrate(gm, [X])
    return gm


def _saved(model, folder) -> str:
    path = os.path.join(folder, "model.safetensors")
    gm = _calibrated(model)
    fxsparse.set_alpha(gm, 0.2)
    fxsparse.save(gm, path)
    return path


def _damaged(model, folder, damage: Callable[[bytes], bytes]) -> None:
    path = _saved(model, folder)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    fxsparse.load(model, path)


def _flip_last_byte(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


def _with_nan(x):
    x = x.clone()
    x[1, 2, 3, 4] = float("nan")
    return x


def _overflowing(model, folder):
    big = nn.Linear(6, 6)
    with torch.no_grad():
        big.weight.fill_(1e30)
    fxsparse.calibrate(fxsparse.prepare(nn.Sequential(big, nn.ReLU()), X), [X * 1e10])


def _foreign_safetensors(model, folder):
    from safetensors.torch import save_file

    path = os.path.join(folder, "weights.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    fxsparse.load(model, path)


def _resume_foreign_checkpoint(model, folder):
    path = os.path.join(folder, "calib.ckpt")
    other = fxsparse.prepare(Small(width=6), X)
    with_failure = [X, X, "stop"]
    try:
        fxsparse.calibrate(other, with_failure, checkpoint=path, checkpoint_every=1)
    except fxsparse.CalibrationError:
        pass  # the "stop" batch: the checkpoint of the first two batches stays
    fxsparse.calibrate(_prepared(model), [X], checkpoint=path)


def _compiled_without_statistics(model, folder):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxsparse.backend({}, alpha=0.2, compiler="eager"))
    try:
        return compiled(X)
    finally:
        torch._dynamo.reset()


def _evaluate(model, data=None, **options):
    options = {"eps": 0.1, "attacks": ["clean", "pgd:steps=1"], **options}
    return fxsparse.evaluate(model, (IMAGES, Y) if data is None else data, **options)


class _FixedSize(nn.Module):
    """A model that asserts its input size, as a ViT's patch embedding does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        assert x.shape[-1] == 6, "input size must be 6"
        return self.model(x)


class _TracedSize(nn.Module):
    """A model whose size check FX traces into the graph (`torch._assert`, a `Proxy` in its message), as a
    timm ViT's patch embedding does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        torch._assert(x.shape[-1] == 6, f"Input width ({x.shape[-1]}) doesn't match model (6).")
        return self.model(x)


def _fx_at_another_size(model, folder):
    gm = fxsparse.prepare(_TracedSize(model), X, capture="fx")
    return gm(torch.randn(2, 3, 8, 8))


def _at_chance(model, folder):
    """A random-init model (small_model's 5 classes) through evaluate: its clean accuracy is at chance."""
    return _evaluate(model, attacks=["clean"])


class _Heldout:
    """A search result whose validation data is IMAGES / Y."""

    @property
    def fingerprints(self):
        from fxsparse.robust.sharding import example_fingerprints

        return set(example_fingerprints(IMAGES, Y))


class _Named(nn.Module):
    """The model's scores inside an object no reader knows."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"scores": self.model(x)}


def _nothing_selected(model, folder):
    return fxsparse.prepare(model, X, select={"kinds": ["silu"]})  # a kind the model does not use


BAD_INPUTS = [
    # model and capture
    BadInput("model is a function, not an nn.Module", lambda m, d: fxsparse.prepare(lambda x: x, X),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("model is a string (a model name)", lambda m, d: fxsparse.sparsify("resnet18", [X]),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("model branches on a tensor value (no capture path works)",
             lambda m, d: fxsparse.prepare(DataDependent(), X), fxsparse.CaptureError, RuntimeError),
    BadInput("example_inputs of the wrong channel count", lambda m, d: fxsparse.prepare(m, torch.randn(2, 5, 6, 6)),
             fxsparse.CaptureError, RuntimeError),
    BadInput("example_inputs is a string", lambda m, d: fxsparse.prepare(m, "x"), fxsparse.FxsparseTypeError,
             TypeError),
    # selection
    BadInput("unknown activation kind in select", lambda m, d: fxsparse.prepare(m, X, select=["swishy"]),
             fxsparse.SelectionError),
    BadInput("unknown key in select", lambda m, d: fxsparse.prepare(m, X, select={"kind": ["relu"]}),
             fxsparse.SelectionError),
    BadInput("model without any activation", lambda m, d: fxsparse.prepare(nn.Sequential(nn.Linear(3, 3)),
                                                                         torch.randn(2, 3)),
             fxsparse.NoActivationWarning),
    BadInput("selection that takes no site", _nothing_selected, fxsparse.NoActivationWarning),
    # calibration data
    BadInput("empty calibration list", lambda m, d: fxsparse.calibrate(_prepared(m), []), fxsparse.CalibrationError),
    BadInput("empty DataLoader", lambda m, d: fxsparse.calibrate(_prepared(m), torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X[:0]), batch_size=2)), fxsparse.CalibrationError),
    BadInput("sparsify with empty data", lambda m, d: fxsparse.sparsify(m, []), fxsparse.CalibrationError),
    BadInput("batch with the wrong channel count",
             lambda m, d: fxsparse.calibrate(_prepared(m), [X, torch.randn(2, 5, 6, 6)]), fxsparse.CalibrationError),
    BadInput("batch of integers (wrong dtype)", lambda m, d: fxsparse.calibrate(_prepared(m), [X.long()]),
             fxsparse.CalibrationError),
    BadInput("batch in float64 for a float32 model", lambda m, d: fxsparse.calibrate(_prepared(m), [X.double()]),
             fxsparse.CalibrationError),
    BadInput("batch is a string", lambda m, d: fxsparse.calibrate(_prepared(m), ["image.png"]),
             fxsparse.CalibrationError),
    BadInput("batch is a numpy array", lambda m, d: fxsparse.calibrate(_prepared(m), [X.numpy()]),
             fxsparse.CalibrationError),
    BadInput("NaN in the second batch", lambda m, d: fxsparse.calibrate(_prepared(m), [X, _with_nan(X)]),
             fxsparse.CalibrationError),
    BadInput("finite batch that overflows a layer to Inf", _overflowing, fxsparse.CalibrationError),
    BadInput("site sees another channel count than at prepare (weightless model)",
             lambda m, d: fxsparse.calibrate(fxsparse.prepare(nn.Sequential(nn.ReLU()), X), [torch.randn(2, 7, 6, 6)]),
             fxsparse.CalibrationError),
    BadInput("calibrate the user's model instead of the prepared one", lambda m, d: fxsparse.calibrate(m, [X]),
             fxsparse.CalibrationError),
    BadInput("checkpoint_every = 0",
             lambda m, d: fxsparse.calibrate(_prepared(m), [X], checkpoint=os.path.join(d, "c"), checkpoint_every=0),
             fxsparse.CalibrationError),
    BadInput("resume from another model's checkpoint", _resume_foreign_checkpoint, fxsparse.CalibrationError),
    # alpha
    BadInput("negative alpha", lambda m, d: fxsparse.set_alpha(_calibrated(m), -0.1), fxsparse.SelectionError),
    BadInput("NaN alpha", lambda m, d: fxsparse.set_alpha(_calibrated(m), float("nan")), fxsparse.SelectionError),
    BadInput("infinite alpha", lambda m, d: fxsparse.set_alpha(_calibrated(m), float("inf")),
             fxsparse.SelectionError),
    BadInput("alpha is a string", lambda m, d: fxsparse.set_alpha(_calibrated(m), "0.2x"), fxsparse.SelectionError),
    BadInput("negative alpha for one site", lambda m, d: fxsparse.set_alpha(_calibrated(m), {"act": -1}),
             fxsparse.SelectionError),
    BadInput("alpha for an unknown site", lambda m, d: fxsparse.set_alpha(_calibrated(m), {"act3": 0.2}),
             fxsparse.SelectionError),
    BadInput("alpha for a glob matching no site", lambda m, d: fxsparse.set_alpha(_calibrated(m), {"layer9.*": 0.2}),
             fxsparse.SelectionError),
    BadInput("non-zero alpha before calibration", lambda m, d: fxsparse.set_alpha(_prepared(m), 0.2),
             fxsparse.CalibrationError),
    BadInput("set_alpha on the user's model", lambda m, d: fxsparse.set_alpha(m, 0.2), fxsparse.SelectionError),
    # persistence
    BadInput("save the user's model", lambda m, d: fxsparse.save(m, os.path.join(d, "x")), fxsparse.PersistenceError),
    BadInput("load a file that does not exist", lambda m, d: fxsparse.load(m, os.path.join(d, "missing")),
             fxsparse.PersistenceError),
    BadInput("load a truncated file", lambda m, d: _damaged(m, d, lambda raw: raw[: len(raw) // 2]),
             fxsparse.PersistenceError),
    BadInput("load a file with one byte of data flipped", lambda m, d: _damaged(m, d, _flip_last_byte),
             fxsparse.PersistenceError),
    BadInput("load a text file", lambda m, d: _damaged(m, d, lambda raw: b"not a model\n"), fxsparse.PersistenceError),
    BadInput("load a safetensors file not written by fxsparse", _foreign_safetensors, fxsparse.PersistenceError),
    BadInput("load into a model with other channel counts",
             lambda m, d: fxsparse.load(Small(width=6), _saved(m, d)), fxsparse.PersistenceError),
    BadInput("load into another architecture",
             lambda m, d: fxsparse.load(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), _saved(m, d)),
             fxsparse.PersistenceError),
    BadInput("load into something that is not a module", lambda m, d: fxsparse.load(None, _saved(m, d)),
             fxsparse.FxsparseTypeError, TypeError),
    # the compile backend
    BadInput("compile backend without statistics for a site", _compiled_without_statistics, fxsparse.SelectionError),
    BadInput("MeanSparse with no channel", lambda m, d: fxsparse.MeanSparse(0), fxsparse.FxsparseValueError),
    # robustness evaluation
    BadInput("unknown attack name", lambda m, d: _evaluate(m, attacks=["pgdd"]), fxsparse.FxsparseValueError),
    BadInput("attack option without a value", lambda m, d: _evaluate(m, attacks=["pgd:steps"]),
             fxsparse.FxsparseValueError),
    BadInput("unknown norm", lambda m, d: _evaluate(m, norm="l1"), fxsparse.FxsparseValueError),
    BadInput("PGD with an unknown norm", lambda m, d: pgd(m, X, Y, 0.1, norm="l3"), fxsparse.FxsparseValueError),
    BadInput("NaN eps", lambda m, d: _evaluate(m, eps=float("nan")), fxsparse.FxsparseValueError),
    BadInput("unknown mode", lambda m, d: _evaluate(m, modes=["adaptive"]), fxsparse.FxsparseValueError),
    BadInput("an attack that was not run", lambda m, d: _evaluate(m)["square"], fxsparse.FxsparseValueError),
    BadInput("evaluation batches of strings", lambda m, d: _evaluate(m, data=["a", "b"]), fxsparse.FxsparseTypeError,
             TypeError),
    BadInput("search_alpha on a model without operators", lambda m, d: fxsparse.search_alpha(m, (IMAGES, Y), eps=0.1),
             fxsparse.SelectionError),
    BadInput("search_alpha with an unknown score", lambda m, d: fxsparse.search_alpha(
        _calibrated(m), (IMAGES, Y), eps=0.1, score="best"), fxsparse.FxsparseValueError),
    BadInput("search_alpha on normalised images", lambda m, d: fxsparse.search_alpha(
        _calibrated(m), (X, Y), eps=0.03, attack="pgd:steps=1"), fxsparse.InputRangeError),
    BadInput("evaluate on normalised images", lambda m, d: _evaluate(m, data=(X, Y)), fxsparse.InputRangeError),
    BadInput("evaluate on 0-255 pixels", lambda m, d: _evaluate(m, data=(IMAGES * 255, Y)), fxsparse.InputRangeError),
    BadInput("evaluate on integer pixels", lambda m, d: _evaluate(m, data=((IMAGES * 255).to(torch.uint8), Y)),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("L-inf eps in pixel units", lambda m, d: _evaluate(m, eps=8), fxsparse.InputRangeError),
    BadInput("L2 eps beyond the input box", lambda m, d: _evaluate(m, eps=20.0, norm="l2"), fxsparse.InputRangeError),
    BadInput("bounds the wrong way round", lambda m, d: _evaluate(m, bounds=(1.0, 0.0)), fxsparse.FxsparseValueError),
    BadInput("a model output without scores", lambda m, d: _evaluate(_Named(m)), fxsparse.FxsparseTypeError,
             TypeError),
    BadInput("logits= that is not a function", lambda m, d: _evaluate(m, logits="logits"),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("compare evaluations of different data", lambda m, d: fxsparse.compare(
        _evaluate(m), _evaluate(m, data=(IMAGES[:2], Y[:2]))), fxsparse.FxsparseValueError),
    BadInput("compare something else", lambda m, d: fxsparse.compare(_evaluate(m), {"clean": 0.9}),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("evaluate on empty data", lambda m, d: _evaluate(m, data=[]), fxsparse.FxsparseValueError),
    BadInput("evaluate with max_examples=0", lambda m, d: _evaluate(m, max_examples=0), fxsparse.FxsparseValueError),
    BadInput("evaluate with labels beyond the model's classes", lambda m, d: _evaluate(m, data=(IMAGES, Y + 5)),
             fxsparse.FxsparseValueError),
    BadInput("evaluate with negative labels", lambda m, d: _evaluate(m, data=(IMAGES, Y - 1)),
             fxsparse.FxsparseValueError),
    BadInput("evaluate with float labels", lambda m, d: _evaluate(m, data=[(IMAGES, Y.float())]),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("evaluate with one-hot labels", lambda m, d: _evaluate(
        m, data=[(IMAGES, torch.nn.functional.one_hot(Y, 5))]), fxsparse.FxsparseValueError),
    BadInput("evaluate with more inputs than labels", lambda m, d: _evaluate(m, data=(IMAGES, Y[:3])),
             fxsparse.FxsparseValueError),
    BadInput("evaluate on grayscale data for an RGB model", lambda m, d: _evaluate(m, data=(IMAGES[:, :1], Y)),
             fxsparse.FxsparseValueError),
    BadInput("evaluate on data of a size the model cannot read", lambda m, d: _evaluate(
        _FixedSize(m), data=(IMAGES[..., :4, :4], Y)), fxsparse.FxsparseValueError),
    BadInput("evaluate on the search's validation data", lambda m, d: _evaluate(
        m, data=[(IMAGES[:2], Y[:2]), (IMAGES[2:], Y[2:])], search=_Heldout()), fxsparse.FxsparseValueError),
    BadInput("grayscale data through an RGB with_normalization", lambda m, d: fxsparse.with_normalization(
        m, (0.5,) * 3, (0.25,) * 3)(IMAGES[:, :1]), fxsparse.FxsparseValueError),
    BadInput("an exclude glob that matches no site", lambda m, d: fxsparse.prepare(
        m, X, select={"exclude": ["convv*"]}), fxsparse.SelectionError),
    BadInput("an include glob that matches no site", lambda m, d: fxsparse.prepare(
        m, X, select={"include": ["no.such.layer"]}), fxsparse.SelectionError),
    BadInput("a tensor passed as the calibration loader", lambda m, d: fxsparse.sparsify(m, X),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("with_normalization with a std of 0", lambda m, d: fxsparse.with_normalization(m, (0.5,) * 3, (0,) * 3),
             fxsparse.FxsparseValueError),
    BadInput("with_normalization with a named preset", lambda m, d: fxsparse.with_normalization(m, "imagenet", 1.0),
             fxsparse.FxsparseTypeError, TypeError),
    BadInput("a random-init model evaluated (clean accuracy at chance)", _at_chance,
             fxsparse.ChanceAccuracyWarning),
    BadInput("an FX-captured model with a size check, called at another size", _fx_at_another_size,
             fxsparse.FxsparseValueError),
    BadInput("a prepared model called on grayscale inputs", lambda m, d: _prepared(m)(X[:, :1]),
             fxsparse.FxsparseValueError),
    BadInput("an export-captured model calibrated on grayscale batches", lambda m, d: fxsparse.calibrate(
        fxsparse.prepare(m, X, capture="export"), [X[:, :1]]), fxsparse.CalibrationError),
    BadInput("normalization_of a plain module", lambda m, d: fxsparse.normalization_of(m), fxsparse.FxsparseValueError),
]
