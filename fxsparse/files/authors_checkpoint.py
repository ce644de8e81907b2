"""Bring in the statistics of the MeanSparse authors' published models (RobustBench `Amini2024MeanSparse_*`).

Their checkpoints hold, per operator, `running_mean`, `running_var` and one scalar `threshold` (plus
`flag_update_statistics`, `batch_num`, and for ConvNeXt `momentum`, `epsilon`, which the forward ignores). Their
operator is where(|x - running_mean| < threshold * sqrt(running_var), running_mean, x): fxsparse's MeanSparse
with mean = running_mean, std = sqrt(running_var), alpha = threshold.

`from_meansparse` prepares the plain base model with a placement preset (wrn, convnext, swin reproduce the
authors' placements), loads the checkpoint's base weights, and matches the checkpoint's operators to the sites
by name (the authors' attribute names, table below), or, when names do not tell, by order; channel counts must
agree. Anything that does not match is refused with what differs.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from fxsparse.api import prepare
from fxsparse.errors import PersistenceError
from fxsparse.ops import MeanSparse, meansparse_ops

_STATS = ("running_mean", "running_var", "threshold")
_EXTRA = ("flag_update_statistics", "batch_num", "momentum", "epsilon")

# the authors' operator names (RobustBench Meansparse_*.py, sparsified_model.py) -> fxsparse's site names
NAME_RULES: Sequence[Tuple[str, str]] = (
    (r"(.*)\.meansparse_0$", r"\1.relu_0"),        # WRN / RaWRN: between batchnorm_0 and relu_0
    (r"(.*)\.meansparse_1$", r"\1.relu_1"),        # between batchnorm_1 and relu_1
    (r"(.*)\.meansparse_2$", r"\1.add"),           # after the residual add
    (r"^(.*?)\.?meansparse_end$", r"\1.relu"),     # between the last batchnorm and the last activation
    (r"(.*)\.mlp\.act\.0$", r"\1.mlp.act"),        # ConvNeXt: before the MLP GELU
    (r"(.*)\.drop_path\.1$", r"\1.branch"),        # ConvNeXt: after drop_path, before the add
    (r"(.*)\.mlp\.meansparse1$", r"\1.mlp.act"),   # Swin: after fc1 (before the GELU)
    (r"(.*)\.mlp\.meansparse2$", r"\1.mlp.fc2"),   # Swin: after fc2
    (r"(.*)\.meansparse1$", r"\1.add"),            # Swin: after the attention residual add
    (r"(.*)\.meansparse2$", r"\1.add_1"),          # Swin: after the MLP residual add
)
PLACEMENTS = ("wrn", "convnext", "swin")


def _operators(state: Mapping[str, torch.Tensor]) -> List[str]:
    """Prefixes of the authors' operators, in state_dict order: those with running_mean, running_var and threshold."""
    out = []
    for key in state:
        if key.endswith(".running_mean") or key == "running_mean":
            prefix = key[: -len("running_mean")].rstrip(".")
            if all(f"{prefix}.{s}".lstrip(".") in state for s in _STATS):
                out.append(prefix)
    return out


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _align(state: Mapping[str, torch.Tensor], base_keys: set) -> Dict[str, torch.Tensor]:
    """Strip `module.` (DataParallel) and, when the base model is not RobustBench's normalising wrapper,
    `model.`, so that the checkpoint's names are the base model's."""
    state = _strip(state, "module.")
    best, best_hits = state, -1
    for prefix in ("", "model."):
        candidate = _strip(state, prefix) if prefix else dict(state)
        hits = sum(k in base_keys for k in candidate)
        if hits > best_hits:
            best, best_hits = candidate, hits
    return best


def _base_weights(model: nn.Module, state: Mapping[str, torch.Tensor], operators: Sequence[str]) -> None:
    """Load the checkpoint's non-MeanSparse entries into `model`, refusing any that do not fit."""
    own = {f"{p}.{s}".lstrip(".") for p in operators for s in _STATS + _EXTRA}
    weights = {k: v for k, v in state.items() if k not in own}
    if not weights:
        return  # statistics only: the base model keeps its weights
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in weights.items()
              if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} base weight(s) missing from the state_dict: {missing[:6]}")
    if unexpected:
        problems.append(f"{len(unexpected)} state_dict entr(ies) not in the base model: {unexpected[:6]}")
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ (state_dict vs base model): {shapes[:4]}")
    if problems:
        raise PersistenceError("the state_dict does not fit the base model: " + "; ".join(problems)
                               + ". Pass the plain architecture the MeanSparse model was built on")
    model.load_state_dict(weights, strict=True)


def _by_name(operators: Sequence[str], ops: Mapping[str, MeanSparse]) -> Optional[Dict[str, str]]:
    """{operator prefix: site name} from NAME_RULES, when every operator maps to a distinct site."""
    out = {}
    for prefix in operators:
        for pattern, repl in NAME_RULES:
            if re.match(pattern, prefix):
                name = re.sub(pattern, repl, prefix).lstrip(".")
                if name in ops:
                    out[prefix] = name
                    break
        else:
            return None
    return out if len(set(out.values())) == len(out) == len(ops) else None


def _match(state, operators: Sequence[str], gm: fx.GraphModule) -> Tuple[Optional[Dict[str, str]], str]:
    """(mapping, "") or (None, what differs)."""
    ops = meansparse_ops(gm)
    if len(operators) != len(ops):
        return None, (f"the state_dict has {len(operators)} MeanSparse operators ({list(operators)[:3]}...), "
                      f"the placement gives {len(ops)} sites ({list(ops)[:3]}...)")
    mapping = _by_name(operators, ops) or dict(zip(operators, ops))  # names first, else graph order
    wrong = [f"{p} has {state[f'{p}.running_mean'.lstrip('.')].numel()} channels, site {s} has {ops[s].channels}"
             for p, s in mapping.items() if state[f"{p}.running_mean".lstrip(".")].numel() != ops[s].channels]
    if wrong:
        return None, f"{len(wrong)} channel count(s) differ: " + "; ".join(wrong[:4])
    return mapping, ""


def from_meansparse(base_model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    placement: Union[None, str, Sequence[str]] = None, example_inputs=None,
                    **prepare_kwargs: Any) -> fx.GraphModule:
    """A GraphModule of `base_model` (the plain architecture; the user's model is not modified) whose MeanSparse
    operators hold the authors' statistics from `state_dict` (a checkpoint of a RobustBench MeanSparse model).

    `placement` is the preset that reproduces the authors' model ("wrn", "convnext", "swin"); None tries each.
    Raises PersistenceError naming what differs when the state_dict does not fit (operator count, channel
    counts, base weights).
    """
    if not isinstance(base_model, nn.Module):
        raise PersistenceError(f"from_meansparse needs the base nn.Module, got {type(base_model).__name__}")
    model = copy.deepcopy(base_model).eval()
    state = _align(state_dict, set(model.state_dict()))
    operators = _operators(state)
    if not operators:
        raise PersistenceError("the state_dict has no MeanSparse operator (entries ending in running_mean, "
                               "running_var and threshold under one name)")
    _base_weights(model, state, operators)
    tried = []
    for candidate in ([placement] if placement is not None else PLACEMENTS):
        gm = prepare(model, example_inputs, placement=candidate, **prepare_kwargs)
        mapping, why = _match(state, operators, gm)
        if mapping is not None:
            break
        tried.append(f"placement {candidate!r}: {why}")
    else:
        raise PersistenceError("the state_dict's MeanSparse operators do not match the sites of the base model: "
                               + " | ".join(tried))
    ops = meansparse_ops(gm)
    with torch.no_grad():
        for prefix, site in mapping.items():
            op, key = ops[site], (lambda s: f"{prefix}.{s}".lstrip("."))
            mean, var, threshold = state[key("running_mean")], state[key("running_var")], state[key("threshold")]
            if threshold.numel() != 1:
                raise PersistenceError(f"{key('threshold')} has {threshold.numel()} values; the authors' "
                                       "threshold is one scalar per operator")
            op.mean.copy_(mean.reshape(-1))
            op.std.copy_(var.reshape(-1).clamp_min(0).sqrt())
            op.alpha.fill_(float(threshold))
            op.refresh_bounds()
            op.count.fill_(1)  # calibrated (the element count behind their statistics is not in the file)
    return gm
