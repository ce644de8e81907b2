"""fxsparse: MeanSparse for any vision model, as a torch.fx pass.

The pipeline, one stage a module or package, in the order a model goes through it (imports run the same way,
from the bottom up: op <- passes <- pipeline <- evaluation / compile <- tools):

    op         fxsparse/ops.py             the MeanSparse operator (buffers mean, std, alpha; derived lo, hi)
                                           (the opt-in fused eager kernel: fxsparse/compile/fused.py)
    capture    fxsparse/capture/           nn.Module -> eval-mode GraphModule with every activation visible:
                                           the fallback policy in __init__; tracer.py (FX), export.py
                                           (torch.export, time limit), quiet.py, guard.py (InputGuard)
    shapes     passes/shapes.py            every node's output shape, by fake-tensor propagation
    layout     passes/layout.py            every tensor's channel axis (or unknown), one forward pass, rules
                                           in a dispatch table; op names and their tables in
                                           passes/vocabulary.py, graph predicates and the walk in
                                           passes/graph.py; a site's axis and channel_dims in passes/sites.py
    locate     passes/locate.py            activation calls of every kind (passes/kinds.py) and composite
                                           ones (passes/composites.py), selected
    place      passes/placement.py         policies beyond "before every activation": residual joins, MLP
                                           outputs, presets for ConvNeXt and Swin
    splice     passes/splice.py            a MeanSparse before each site, on the channel axis the layout
                                           proves (LayoutWarning where it cannot); private inputs
                                           (passes/private_inputs.py)
    prepare    fxsparse/api.py             Recipe (the intent, one frozen object, one meta key); capture ->
                                           propagate shapes -> layout -> place -> splice; sparsify = prepare
                                           + calibrate + alpha
    calibrate  fxsparse/calibrate/         exact per-channel mean/std of each site's input over data
                                           (stats.py: the one formula; checkpoint.py; distributed.py: across
                                           processes; compiled.py: as one compiled program; diagnose.py:
                                           which layer refused a batch)
    operators  fxsparse/operators.py       set_alpha, straight_through and its surrogate gradients
    audit      fxsparse/audit.py           one record per site: Markdown, JSON, networkx
    files      fxsparse/files/             save / load (persist.py; safetensors + JSON header, safefile.py),
                                           resume files of long runs (resume.py), from_meansparse: the
                                           authors' published statistics (authors_checkpoint.py)

Around the pipeline, one subpackage per concern:

    fxsparse/robust/     threat.py (ThreatModel: eps, norm, bounds, validated once; the settings evaluate
                         and search_alpha share), attacks.py, evaluation.py (evaluate: reads the data, runs
                         every batch, resumes), columns.py (the named attacks and the column runner: as is,
                         BPDA, smooth, anneal, transfer, given inputs), results.py (AttackResult, Evaluation:
                         the worst case, Markdown, JSON), curve.py (a robustness curve), search.py
                         (search_alpha), compare.py (paired McNemar); guards.py (data in bounds, data that
                         fits the model), outputs.py (logits of any classifier), normalization.py
                         (with_normalization: the input normalisation inside the model, so attacks work on
                         [0, 1] images), sharding.py (per-example randomness, outcomes across ranks),
                         plots.py (the `eval` and `plot` extras)
    fxsparse/compile/    a torch.compile backend for models no capture path handles whole; fused.py, the
                         opt-in fused eager kernel (set_eager_kernel)
    fxsparse/tools/      the `fxsparse` command, its data sources (data.py: image folders, .pt files, digits),
                         the demo, model names (zoo), the run-time coverage oracle
    fxsparse/testing/    models and bad inputs shared by the test suite and the benchmarks

Graph meta keys live in fxsparse/_meta.py; every switch and FXSPARSE_* variable in fxsparse/config.py;
helpers shared across layers in fxsparse/util.py.
"""
from __future__ import annotations

from fxsparse.errors import (BackendError, CalibrationError, CaptureError, ChanceAccuracyWarning, DistributedError,
                             FxsparseError, FxsparseTypeError, FxsparseValueError, InputRangeError, LayoutWarning,
                             MissingDependencyError, NoActivationWarning, PersistenceError, ScoreAttackWarning,
                             SearchWarning, SelectionError)
from fxsparse.ops import MeanSparse, meansparse_ops
from fxsparse.compile.fused import eager_kernel, set_eager_kernel
from fxsparse.passes.kinds import ActivationKind, activation_kinds, register_activation
from fxsparse.passes.locate import Selection, Site, locate
from fxsparse.passes.splice import splice
from fxsparse.passes.placement import PRESETS, place, residual_joins
from fxsparse.capture import capture
from fxsparse.calibrate import calibrate
from fxsparse.operators import set_alpha, straight_through
from fxsparse.audit import Audit, SiteRecord, audit
from fxsparse.api import Recipe, prepare, sparsify
from fxsparse.files.persist import load, save
from fxsparse.files.authors_checkpoint import from_meansparse
from fxsparse.compile.backend import MeanSparseBackend, backend, statistics
from fxsparse.robust.normalization import normalization_of, with_normalization
from fxsparse.robust.compare import Comparison, compare
from fxsparse.robust.evaluation import Evaluation, evaluate
from fxsparse.robust.threat import ThreatModel
from fxsparse.robust.search import SearchResult, search_alpha

from fxsparse._version import __version__  # noqa: F401

__all__ = [
    # the pipeline
    "sparsify", "prepare", "Recipe", "calibrate", "set_alpha", "audit", "straight_through", "save", "load",
    "from_meansparse", "with_normalization", "normalization_of",
    # the operator and its kernels
    "MeanSparse", "meansparse_ops", "set_eager_kernel", "eager_kernel",
    # passes, for compile pipelines and control
    "capture", "locate", "place", "splice", "residual_joins", "PRESETS", "Selection", "Site",
    "register_activation", "ActivationKind", "activation_kinds", "backend", "MeanSparseBackend", "statistics",
    # results
    "Audit", "SiteRecord", "evaluate", "Evaluation", "ThreatModel", "compare", "Comparison", "search_alpha",
    "SearchResult",
    # errors and warnings
    "FxsparseError", "FxsparseValueError", "FxsparseTypeError", "CaptureError", "CalibrationError", "SelectionError",
    "PersistenceError", "InputRangeError", "BackendError", "DistributedError", "MissingDependencyError",
    "NoActivationWarning", "LayoutWarning", "SearchWarning", "ChanceAccuracyWarning", "ScoreAttackWarning",
]
