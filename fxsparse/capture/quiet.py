"""Capture is quiet: what torch prints, logs or warns while a capture path fails stays out of the terminal.

Our own error says what went wrong (its `__cause__` has torch's); `FXSPARSE_DEBUG=1` (fxsparse/config.py)
lets everything through.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

from fxsparse.config import is_debug


_NOISY_LOGGERS = ("torch", "torch.fx", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export",
                  "torch._dynamo", "torch._subclasses", "torch._functorch", "torch._guards")


@contextlib.contextmanager
def quiet():
    """Capture attempts that fail (and fall back) print tracebacks (ShapeProp), log guards and dump graphs
    (export): keep all of it out of the user's terminal; the buffer holds what was printed. Our own error says
    what went wrong (its __cause__ has torch's); FXSPARSE_DEBUG=1 shows everything."""
    buffer = io.StringIO()
    if is_debug():
        yield buffer
        return
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
