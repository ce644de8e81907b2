"""Errors raised by fxsparse: one base class, so callers can catch everything we raise."""


class FxsparseError(Exception):
    """Base class of every error fxsparse raises. Messages say what went wrong and what to do."""


class CaptureError(FxsparseError):
    """No capture path could turn the model into a GraphModule."""


class CalibrationError(FxsparseError):
    """Calibration data was empty, malformed, or produced non-finite values."""


class SelectionError(FxsparseError):
    """A selection, a site name or an alpha value does not fit the model."""


class PersistenceError(FxsparseError):
    """A saved file is unreadable, corrupt, or does not match the model it is loaded into."""


class NoActivationWarning(UserWarning):
    """The model has no selected activation: fxsparse leaves it unchanged rather than failing."""


class LayoutWarning(UserWarning):
    """fxsparse could not prove a site's channel axis and used a default (or found one that contradicts a
    declared channel count): the message names the sites and the fix, `channel_dims={site: dim}`."""
