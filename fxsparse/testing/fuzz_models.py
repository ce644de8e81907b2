"""Random small models for fuzzing the whole pipeline, and the properties every one of them must satisfy.

A model is a list of steps run on a (B, C, H, W) input: conv / BatchNorm / GroupNorm / timm's BatchNormAct2d
on spatial layouts, Linear / LayerNorm on channels-last layouts, activations in every spelling of every kind
(called once or twice, in place or not), branches that feed one tensor to an activation and to something else,
in-place arithmetic, residual joins (also in place), and layout changes to NHWC and to (B, H*W, C) tokens.
The model counts its own activation calls as it runs, which is the ground truth the pass is checked against.

Used by tests/test_fuzz.py (a bounded profile) and benchmarks/fuzz.py (the long run).
"""
import collections
import dataclasses
import os
import tempfile
import warnings
from typing import List, Optional, Tuple

import torch
from hypothesis import strategies as st
from timm.layers import BatchNormAct2d
from torch import nn

import fxsparse
from fxsparse.testing.spellings import GATES, SPELLINGS, instantiate

C, H, W = 6, 5, 4  # distinct sizes: a wrong channel axis shows up as a wrong channel count
SPELLING = {s[0]: s for s in SPELLINGS}
NORM_ACTS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "hard_swish": "hardswish", "mish": "mish",
             "leaky_relu": "leaky_relu", "elu": "elu", "relu6": "relu6", "prelu": "prelu"}  # timm name -> kind


def _to_nchw(x, layout):
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "tokens":
        return x.transpose(1, 2).reshape(-1, C, H, W)
    return x


def _from_nchw(x, layout):
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1)
    if layout == "tokens":
        return x.flatten(2).transpose(1, 2)
    return x


class FuzzNet(nn.Module):
    """Runs `steps` (see the module docstring); `self.calls` counts activation calls by kind."""

    def __init__(self, steps):
        super().__init__()
        self.steps = [tuple(s) for s in steps]
        self.layers = nn.ModuleDict()
        self.calls = collections.Counter()
        for i, step in enumerate(self.steps):
            op, key = step[0], str(i)
            if op == "conv":
                self.layers[key] = nn.Conv2d(C, C, step[1], padding=step[1] // 2)
            elif op in ("bn", "normact"):
                norm = nn.BatchNorm2d(C) if op == "bn" else BatchNormAct2d(C, act_layer=step[1])
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
                self.layers[key] = norm
            elif op == "groupnorm":
                self.layers[key] = nn.GroupNorm(3, C)
            elif op == "linear":
                self.layers[key] = nn.Linear(C, C)
            elif op == "layernorm":
                self.layers[key] = nn.LayerNorm(C)
            elif op in ("act", "branch"):
                self._add_activation(key, step[1])
            elif op == "two_acts":
                self._add_activation(key + "a", step[1])
                self._add_activation(key + "b", step[2])

    def _add_activation(self, key: str, spelling: str) -> None:
        act = instantiate(SPELLING[spelling])
        if isinstance(act, nn.Module):
            self.layers[key] = act
        else:  # a plain attribute, the way timm keeps `self.act_fn`
            setattr(self, f"fn{key}", act)

    def _act(self, key: str, spelling: str, x):
        self.calls[SPELLING[spelling][1]] += 1
        fn = getattr(self, f"fn{key}", None)
        return fn(x) if fn is not None else self.layers[key](x)

    def forward(self, x):
        layout, saved, saved_layout = "nchw", x, "nchw"
        for i, step in enumerate(self.steps):
            op, key = step[0], str(i)
            if op in ("conv", "bn", "groupnorm", "normact"):
                if op == "normact":
                    self.calls[NORM_ACTS[step[1]]] += 1
                x = _from_nchw(self.layers[key](_to_nchw(x, layout)), layout)
            elif op in ("linear", "layernorm"):
                x = self.layers[key](x) if layout != "nchw" else self.layers[key](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif op == "act":
                for _ in range(step[2]):
                    x = self._act(key, step[1], x)
            elif op == "branch":  # the activation's input also feeds the add (after it, if the activation is in place)
                x = self._act(key, step[1], x) + x
            elif op == "two_acts":  # two activations read one tensor
                x = self._act(key + "a", step[1], x) * self._act(key + "b", step[2], x)
            elif op == "inplace":
                x = x.add_(0.25) if step[1] == "add_" else x.mul_(1.5)
            elif op == "save":
                saved, saved_layout = x, layout
            elif op == "add" and saved_layout == layout:
                x = x + saved
            elif op == "iadd" and saved_layout == layout:  # `x += saved` is not traced in place (see test_fuzz)
                x = x.add_(saved)
            elif op == "layout" and step[1] != layout:
                x, layout = _from_nchw(_to_nchw(x, layout), step[1]), step[1]
        return _to_nchw(x, layout)


@dataclasses.dataclass
class Spec:
    steps: List[Tuple]
    select_gates: bool  # select every kind the model uses (gates included) instead of the default kinds
    seed: int

    def kinds_used(self) -> List[str]:
        kinds = set()
        for step in self.steps:
            if step[0] in ("act", "branch", "two_acts"):
                kinds.update(SPELLING[s][1] for s in step[1:] if isinstance(s, str))
            elif step[0] == "normact":
                kinds.add(NORM_ACTS[step[1]])
        return sorted(kinds)

    def selection(self) -> Optional[List[str]]:
        return self.kinds_used() if self.select_gates and self.kinds_used() else None

    def selected(self, kind: str) -> bool:
        return kind in self.kinds_used() if self.selection() else kind not in GATES

    def build(self, dtype=torch.float32) -> Tuple[FuzzNet, List[torch.Tensor]]:
        torch.manual_seed(self.seed)
        model = FuzzNet(self.steps).eval().to(dtype)
        gen = torch.Generator().manual_seed(self.seed)
        batches = [torch.randn(3, C, H, W, generator=gen, dtype=dtype) for _ in range(3)]
        return model, batches


SPELLING_IDS = st.sampled_from(sorted(SPELLING))
LAYERS = st.sampled_from([("conv", 1), ("conv", 3), ("bn",), ("groupnorm",), ("linear",), ("layernorm",)])
PLUMBING = st.sampled_from([("save",), ("add",), ("iadd",), ("inplace", "add_"), ("inplace", "mul_"),
                            ("layout", "nchw"), ("layout", "nhwc"), ("layout", "tokens")])
ACT = st.tuples(st.just("act"), SPELLING_IDS, st.integers(1, 2))
STEP = st.one_of(  # repeated entries weigh layers, plumbing and plain activations more
    LAYERS, LAYERS, PLUMBING, PLUMBING, ACT, ACT,
    st.tuples(st.just("branch"), SPELLING_IDS),
    st.tuples(st.just("two_acts"), SPELLING_IDS, SPELLING_IDS),
    st.tuples(st.just("normact"), st.sampled_from(sorted(NORM_ACTS))),
)


SPECS = st.builds(Spec, steps=st.lists(STEP, min_size=1, max_size=12), select_gates=st.booleans(),
                  seed=st.integers(0, 2 ** 31 - 1))


# ---- the properties ----------------------------------------------------------------------------------------
def _equal(a, b) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _run(module, x):
    with torch.no_grad():
        return module(x.clone())  # clones: in-place steps may write into the input


def operator_calls(gm, x) -> collections.Counter:
    """MeanSparse calls by kind during one forward of `gm`, counted by hooks."""
    calls = collections.Counter()
    handles = [op.register_forward_pre_hook(lambda m, args: calls.update([m.kind]))
               for op in fxsparse.meansparse_ops(gm).values()]
    try:
        _run(gm, x)
    finally:
        for h in handles:
            h.remove()
    return calls


def activation_calls(spec: Spec, model: FuzzNet, x) -> collections.Counter:
    """The selected activation calls the original model makes in one forward, by kind."""
    model.calls.clear()
    _run(model, x)
    return collections.Counter({k: n for k, n in model.calls.items() if spec.selected(k)})


def _prepare(spec: Spec, model, x):
    with warnings.catch_warnings():  # models without a selected activation are expected here
        warnings.simplefilter("ignore", fxsparse.NoActivationWarning)
        return fxsparse.prepare(model, x, select=spec.selection())


def check_pipeline(spec: Spec, alpha: float) -> None:
    """alpha = 0 exact; one operator per selected activation call, on the channel axis; save/load exact."""
    model, batches = spec.build()
    x = batches[0]
    gm = _prepare(spec, model, x)
    assert all(r.channels == C for r in fxsparse.audit(gm)), fxsparse.audit(gm).to_markdown()
    assert _equal(_run(gm, x), _run(model, x)), "alpha = 0 changed the output"
    assert operator_calls(gm, x) == activation_calls(spec, model, x)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), fxsparse.MeanSparse):
            assert len(node.users) == 1, f"{node.name} feeds {list(node.users)}"
    if not fxsparse.meansparse_ops(gm):
        return
    fxsparse.calibrate(gm, batches)
    fxsparse.set_alpha(gm, alpha)
    expected = _run(gm, x)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.safetensors")
        fxsparse.save(gm, path)
        loaded = fxsparse.load(model, path)
    assert _equal(_run(loaded, x), expected), "save/load changed the output"


def check_compiled_matches_eager(spec: Spec, alpha: float) -> None:
    """torch.compile (Inductor) equals eager in float64 at alpha > 0."""
    model, batches = spec.build(torch.float64)
    gm = _prepare(spec, model, batches[0])
    if not fxsparse.meansparse_ops(gm):
        return
    fxsparse.calibrate(gm, batches)
    fxsparse.set_alpha(gm, alpha)
    torch._dynamo.reset()
    compiled = torch.compile(gm)
    x = batches[0]
    torch.testing.assert_close(_run(compiled, x), _run(gm, x), rtol=1e-9, atol=1e-9, equal_nan=True)
