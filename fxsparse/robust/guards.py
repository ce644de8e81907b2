"""Checks that an attack's numbers mean what they say: data inside `bounds`, a budget that fits them (the
budget's own checks are the ThreatModel's, fxsparse/robust/threat.py), data that fits the model.

Attacks clip to `bounds` and measure `eps` in input units. Normalised images (values below 0), 0-255 pixels,
or `eps=8` meant as 8/255 give accuracies that are wrong without any error; these checks refuse them and
name the fix. They cost a min and a max per batch.
"""
from __future__ import annotations

import collections.abc
import math
from typing import Sequence

import torch

from fxsparse.errors import FxsparseTypeError, FxsparseValueError, InputRangeError
from fxsparse.robust.threat import NORMS, ThreatModel, canonical_norm, check_bounds

# the threat's checks live in fxsparse/robust/threat.py; their old names stay importable from here
__all__ = ["NORMS", "canonical_norm", "check_bounds", "check_budget", "check_l2_budget", "check_batch",
           "input_channels", "check_fits", "check_labels", "check_evaluation_data"]


def check_budget(eps: float, norm: str, bounds: Sequence[float]) -> str:
    """eps and norm before any data (the ThreatModel's checks, fxsparse/robust/threat.py). Returns the norm as
    fxsparse spells it."""
    return ThreatModel(eps, norm, bounds).norm


def check_l2_budget(eps: float, x: torch.Tensor, bounds: Sequence[float]) -> None:
    """An L2 eps no larger than the diameter of the input box: `ThreatModel.check_l2`."""
    ThreatModel(eps, "l2", bounds).check_l2(x)


def check_batch(x: torch.Tensor, bounds: Sequence[float], index: int) -> None:
    """Every value of batch `index` inside `bounds` (up to float rounding), or an error naming the fix."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise FxsparseTypeError(f"evaluation batch {index} must be a floating-point tensor of images, got "
                                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; convert "
                                "images with x.float() / 255")
    if not x.numel():
        return
    lo, hi = check_bounds(bounds)
    slack = 1e-5 * (hi - lo)
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if low >= lo - slack and high <= hi + slack:
        return
    if not (math.isfinite(low) and math.isfinite(high)):
        why = "holds NaN or Inf: clean the data"
    elif low < lo and high < 8 * (hi - lo) + hi and low > lo - 8 * (hi - lo):
        why = ("looks normalised (mean/std): give [0, 1] images and put the normalisation inside the model: "
               "fxsparse.with_normalization(model, mean, std) (fxsparse.normalization_of(model) reads them from "
               "a timm model or torchvision weights)")
    elif high > hi and high <= 255 * (hi - lo) + lo + slack:
        why = "looks like 0-255 pixels: divide the images by 255"
    else:
        why = "give images in the bounds, or the bounds of your images (bounds=(low, high))"
    raise InputRangeError(f"evaluation batch {index} holds values in [{low:.4g}, {high:.4g}], outside the attack "
                          f"bounds [{lo:g}, {hi:g}]: the attacks would clip the images and the accuracies would be "
                          f"wrong. The data {why}")


def input_channels(model: torch.nn.Module):
    """The channels the model's first convolution reads (graph order for a GraphModule), or None."""
    from torch.nn.modules.conv import _ConvNd

    if isinstance(model, torch.fx.GraphModule):
        modules = dict(model.named_modules())
        for node in model.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), _ConvNd):
                return modules[node.target].in_channels
        return None
    return next((m.in_channels for m in model.modules() if isinstance(m, _ConvNd)), None)


def check_fits(model: torch.nn.Module, net, x: torch.Tensor, device) -> int:
    """The number of classes the model scores, from one forward on one example; data whose channels or size
    cannot fit the model (8x8 grayscale digits into an ImageNet model) is refused before any attack."""
    from fxsparse.errors import FxsparseError

    channels = input_channels(model)
    if channels is not None and x.dim() >= 3 and x.shape[1] != channels:
        raise FxsparseValueError(
            f"the data has {x.shape[1]} channel(s) (batches of shape {tuple(x.shape)}) but the model's first "
            f"convolution reads {channels}: give data the model was made for (grayscale into an RGB model: "
            "x.expand(-1, 3, -1, -1) only if that is what you mean)")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = net(x[:1].to(device))
    except FxsparseError:
        raise
    except (RuntimeError, AssertionError, ValueError, IndexError) as exc:
        raise FxsparseValueError(
            f"examples of shape {tuple(x.shape[1:])} do not fit the model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): give data of the size and channels the model "
            "was made for") from None
    finally:
        model.train(was_training)
    return int(out.shape[-1])


def check_labels(x: torch.Tensor, y: torch.Tensor, classes: int, index: int) -> None:
    """Labels are 1-D integer class indices in [0, classes), one per example."""
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise FxsparseTypeError(f"evaluation batch {index} has {y.dtype} labels: labels must be integer class indices "
                                "(convert with y.long(); one-hot labels: y.argmax(1))")
    if y.dim() != 1:
        raise FxsparseValueError(f"evaluation batch {index} has labels of shape {tuple(y.shape)}: labels must be one "
                                 "class index per example, a 1-D tensor (one-hot labels: y.argmax(1))")
    if len(x) != len(y):
        raise FxsparseValueError(f"evaluation batch {index} has {len(x)} inputs and {len(y)} labels: give one "
                                 "label per input")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise FxsparseValueError(f"evaluation batch {index} has labels in [{int(y.min())}, {int(y.max())}] but the "
                                 f"model scores {classes} classes: labels must lie in [0, {classes - 1}] (the "
                                 "model and the data's classes must match)")


def check_evaluation_data(model: torch.nn.Module, net, data, *, batch_size: int, max_examples, heldout, device):
    """Everything `evaluate` checks before its first attack, in one pass over the data: examples there at all,
    labels (dtype, shape, range against the model's outputs), x / y lengths, data that fits the model, and the
    examples shared with the search's validation data (counted over the whole data). Returns (data, classes):
    a one-shot iterator (a generator) is read here, once, into a list of its batches (up to `max_examples`),
    which replaces it; `classes` is what the model scores (None when this rank saw no example).

    Under torch.distributed a check fails on every rank together (`failing_together`): a bad label in one
    rank's shard must not leave the other ranks waiting in the evaluation's first collective."""
    from fxsparse.calibrate.distributed import failing_together
    from fxsparse.errors import DistributedError

    with failing_together("the evaluation data check", DistributedError):
        return _check_evaluation_data(model, net, data, batch_size, max_examples, heldout, device)


def _check_evaluation_data(model, net, data, batch_size, max_examples, heldout, device):
    from fxsparse.calibrate.distributed import rank_and_size
    from fxsparse.inputs import iter_batches
    from fxsparse.robust.sharding import example_fingerprints

    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise FxsparseValueError(f"max_examples must be a positive number of examples or None, got {max_examples!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() > data[1].dim() and len(data[0]) != len(data[1]):
        raise FxsparseValueError(f"the data has {len(data[0])} inputs and {len(data[1])} labels: give one label per "
                                 "input")
    if isinstance(data, collections.abc.Iterator):  # a generator: read once, here (no iter() on a DataLoader)
        data = list(iter_batches(data, batch_size, max_examples))
    classes, n, shared = None, 0, 0
    for index, (x, y) in enumerate(iter_batches(data, batch_size, max_examples)):
        if classes is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            classes = check_fits(model, net, x, device)
        if classes is not None:
            check_labels(x, y, classes, index)
        if heldout:
            shared += sum(f in heldout for f in example_fingerprints(x, y))
        n += len(x)
    if n == 0 and rank_and_size()[1] == 1:  # under torch.distributed a rank's shard may be empty
        raise FxsparseValueError("the evaluation data holds no examples (empty data, or max_examples cut it to "
                                 "none): give at least one (x, y) example")
    if shared:
        raise FxsparseValueError(f"the evaluation data shares {shared} example(s) with the validation data "
                                 "search_alpha chose alpha on; evaluate on a held-out test split")
    return data, classes


def validation_batches(data, batch_size: int, max_examples) -> list:
    """search_alpha's validation batches, read once. Under torch.distributed a malformed batch fails every rank
    together, and the data is empty only when every rank's shard is (one empty shard is allowed, as in
    `evaluate`), so no rank raises while the others wait for it."""
    from fxsparse.calibrate import distributed
    from fxsparse.errors import DistributedError
    from fxsparse.inputs import iter_batches

    with distributed.failing_together("reading the validation data", DistributedError):
        batches = list(iter_batches(data, batch_size, max_examples))
    if distributed.sum_across_ranks(sum(len(x) for x, _ in batches)) == 0:
        raise FxsparseValueError("the validation data is empty: give (x, y) validation batches")
    return batches


def score_attack(attack: str) -> str:
    """search_alpha's default score attack, with a ScoreAttackWarning when it is the fallback (no reference
    APGD installed): the alpha chosen depends on the attack that scored, so a user must know it was another."""
    if attack != "apgd-ce":
        import warnings

        from fxsparse.errors import ScoreAttackWarning

        warnings.warn(ScoreAttackWarning(
            f"search_alpha scores alphas with the fallback attack {attack!r}: the reference APGD-CE (pyautoattack, "
            "or RobustBench's git autoattack) is not installed, so an install with it can choose another alpha. "
            "Install it (pip install 'fxsparse[eval]') or pass attack= to fix the score attack whatever is "
            "installed; SearchResult.attack and its table record the attack that scored"), stacklevel=3)
    return attack


def chance_noise(classes: int, n: int) -> float:
    """Chance accuracy plus two binomial standard errors: a clean accuracy at or below it is no evidence the
    model has learnt anything (on 40 examples of 10 classes, 19.5%)."""
    chance = 1.0 / classes
    return chance + 2.0 * math.sqrt(chance * (1.0 - chance) / n)


def warn_if_chance(evaluation, classes) -> None:
    """A ChanceAccuracyWarning when the clean row is at chance: a random-init model through the Python API
    would otherwise print a confident table of robust accuracies that mean nothing."""
    import warnings

    from fxsparse.errors import ChanceAccuracyWarning

    clean = next((r for r in evaluation.results if r.attack == "clean"), None)
    if clean is None or not classes or classes < 2 or not evaluation.n or not clean.correct:
        return
    accuracy = float(next(iter(clean.correct.values())).float().mean())  # every column of "clean" is one run
    if accuracy > chance_noise(classes, evaluation.n):
        return
    warnings.warn(ChanceAccuracyWarning(
        f"clean accuracy {100 * accuracy:.1f}% on {evaluation.n} examples is at chance for {classes} classes "
        f"({100 / classes:.1f}%, within noise): the robust accuracies mean nothing. Likely causes: random weights "
        "(no trained checkpoint loaded: timm.create_model(..., pretrained=True) or model.load_state_dict), the "
        "wrong preprocessing (give [0, 1] images and put the model's normalisation inside it: "
        "fxsparse.with_normalization), or labels in another class order than the model's"), stacklevel=3)
