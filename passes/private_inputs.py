"""Private inputs: graph values that are fresh tensors and have exactly one reader.

"Fresh" means the producer always returns new storage: a linear map, a convolution, a normalisation layer,
or an out-of-place arithmetic operator. Library modules count only when their class keeps the library's own
`forward` (a subclass or an instance that overrides it might return its input or a cached tensor).

The splice pass records the result on each operator (`private_input`, shown by the audit). The operator
does not act on it: overwriting a private input in eager mode saved an allocation, but proving at run time
that no hook kept a view of the tensor needed a private torch API (the storage use count), so eager mode
writes into its input only where the activation itself was in place. The forward-hook dicts returned here
let a future user of the mark check the producer's hooks at call time.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxsparse.passes.vocabulary import FRESH_ATEN_OPS, FRESH_METHODS

_FRESH_MODULE_FORWARDS = {cls.forward for cls in (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)}

_FRESH_FUNCTIONS = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.layer_norm, F.group_norm, F.batch_norm,
    F.instance_norm, torch.conv1d, torch.conv2d, torch.conv3d, torch.matmul, torch.mm, torch.bmm, torch.addmm,
    torch.baddbmm, torch.add, torch.sub, torch.mul, torch.div, operator.add, operator.sub, operator.mul,
    operator.truediv, operator.matmul,
}

def _fresh_aten(target) -> bool:
    packet = getattr(target, "overloadpacket", None)
    return (isinstance(packet, torch._ops.OpOverloadPacket) and packet.__name__ in FRESH_ATEN_OPS
            and packet.__module__.endswith("aten"))


def producer_hooks(gm: fx.GraphModule, value: fx.Node, reader: fx.Node) -> Optional[Tuple[dict, ...]]:
    """If `value` is private to `reader`, the forward-hook dicts that could still expose it (empty for a
    function); None if it is not private."""
    if list(value.users) != [reader] or "out" in value.kwargs:
        return None
    if value.op == "call_module":
        module = gm.get_submodule(value.target)
        if type(module).forward not in _FRESH_MODULE_FORWARDS or "forward" in vars(module):  # no override
            return None
        return (module._forward_hooks,)
    if value.op == "call_function" and (value.target in _FRESH_FUNCTIONS or _fresh_aten(value.target)):
        return ()
    if value.op == "call_method" and value.target in FRESH_METHODS:
        return ()
    return None
