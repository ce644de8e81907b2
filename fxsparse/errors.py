"""Errors raised by fxsparse: one base class, so callers can catch everything we raise.

Each error also subclasses the builtin a Python user expects for its cause (timm and torch callers catch
`ValueError` / `TypeError`): a wrong value is a `ValueError`, an argument of the wrong type a `TypeError`,
a model no capture path handles a `RuntimeError`.
"""


class FxsparseError(Exception):
    """Base class of every error fxsparse raises. Messages say what went wrong and what to do."""


class FxsparseValueError(FxsparseError, ValueError):
    """An argument has the right type but a value fxsparse cannot use (a norm name, an eps, an attack)."""


class FxsparseTypeError(FxsparseError, TypeError):
    """An argument has the wrong type (a function where a module is needed, a string where a tensor is)."""


class CaptureError(FxsparseError, RuntimeError):
    """No capture path could turn the model into a GraphModule."""


class CalibrationError(FxsparseError, ValueError):
    """Calibration data was empty, malformed, or produced non-finite values."""


class SelectionError(FxsparseError, ValueError):
    """A selection, a site name or an alpha value does not fit the model."""


class PersistenceError(FxsparseError, ValueError):
    """A saved file is unreadable, corrupt, or does not match the model it is loaded into."""


class InputRangeError(FxsparseValueError):
    """Evaluation data lies outside the attack's `bounds`, or the perturbation budget does not fit them."""


class DistributedError(FxsparseError, RuntimeError):
    """Another process of a torch.distributed run failed; its own error says why."""


class BackendError(FxsparseError, RuntimeError):
    """The torch.compile backend could not apply MeanSparse to a graph Dynamo handed it."""


class MissingDependencyError(FxsparseError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""


class NoActivationWarning(UserWarning):
    """The model has no selected activation: fxsparse leaves it unchanged rather than failing."""


class SearchWarning(UserWarning):
    """search_alpha's pick deserves a second look: no gain beyond noise, or the best alpha at the grid's top."""


class LayoutWarning(UserWarning):
    """fxsparse could not prove a site's channel axis and used a default (or found one that contradicts a
    declared channel count): the message names the sites and the fix, `channel_dims={site: dim}`."""


class ChanceAccuracyWarning(UserWarning):
    """`evaluate` measured a clean accuracy at or below chance (1 / classes, within noise): the robust numbers
    beside it mean nothing. Random weights (no checkpoint loaded), the wrong preprocessing or labels that do not
    match the model's classes are the usual causes."""


class ScoreAttackWarning(UserWarning):
    """`search_alpha` scored alphas with the fallback attack because the reference APGD (pyautoattack) is not
    installed: another install, with it, can pick another alpha. `pip install 'fxsparse[eval]'`."""
