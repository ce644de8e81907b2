"""Every key fxsparse writes into `node.meta` or `GraphModule.meta`, in one place.

Node keys:
    PATH_META               the module path a node came from ("layer1.0.conv1"), as capture records it
    ACTIVATION_MODULE_META  export graphs: the ATen op is the whole forward of an activation module
    SHAPE_META              the node's output shape, from shape propagation
    INNER_META              opaque-leaf nodes: {activation path inside the leaf: its input shape}
    SITE_META               MeanSparse nodes: the site name the operator serves
    LAYOUT_META             the node's channel axis and its provenance (passes/layout.py: Layout)

GraphModule keys:
    CAPTURE_META            the CaptureReport: which capture path was taken and why
    SHAPES_META             "fake" or "real": how shapes were propagated
    PREPARE_META            what fxsparse.prepare was asked (its Recipe's record and the example call, written
                            once), for fxsparse.load and calibration's batch checks

`sparsified_part` is the one lookup of the GraphModule that carries PREPARE_META inside a model.
"""
from typing import Optional

from torch import fx, nn

PATH_META = "fxsparse_path"
ACTIVATION_MODULE_META = "fxsparse_activation_module"
SHAPE_META = "fxsparse_shape"
INNER_META = "fxsparse_inner_shapes"
SITE_META = "fxsparse_site"
LAYOUT_META = "fxsparse_layout"

CAPTURE_META = "fxsparse_capture"
SHAPES_META = "fxsparse_shapes"
PREPARE_META = "fxsparse_prepare"


def sparsified_part(model: nn.Module) -> Optional[fx.GraphModule]:
    """The GraphModule fxsparse.prepare made: `model` itself, or the one inside it (the part that
    `prepare(..., submodule=)` replaced, or a prepared model wrapped by with_normalization); None when there is
    none, or several."""
    if isinstance(model, fx.GraphModule) and PREPARE_META in model.meta:
        return model
    parts = [m for m in model.modules() if isinstance(m, fx.GraphModule) and PREPARE_META in m.meta]
    return parts[0] if len(parts) == 1 else None
