"""ServerState ⇄ plain nested dicts of tensors and numbers.

The result loads with ``torch.load(weights_only=True)`` (no pickled classes),
so a checkpoint cannot execute code, and transports (Flower records) can
flatten it without knowing the core's classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, LoraSpec
from .basis_svd import BasisSVD
from .factored import SVD, Factored
from .state import ServerState

__all__ = ["state_to_dict", "state_from_dict"]


def _encode(x: Any) -> Any:
    if isinstance(x, Adapter):
        return {"__adapter__": True, "B": x.B, "A": x.A, "scale": float(x.scale)}
    if isinstance(x, Factored):
        return {"__factored__": True, "L": x.L, "R": x.R}
    if isinstance(x, SVD):
        return {"__svd__": True, "U": x.U, "S": x.S, "Vh": x.Vh}
    if isinstance(x, BasisSVD):
        return {"__basis_svd__": True, **x.to_dict()}
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if isinstance(x, (Tensor, int, float, str, bool)) or x is None:
        return x
    raise TypeError(f"cannot serialise {type(x).__name__} in server state")


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if x.get("__adapter__"):
            return Adapter(x["B"], x["A"], x["scale"])
        if x.get("__factored__"):
            return Factored(x["L"], x["R"])
        if x.get("__svd__"):
            return SVD(x["U"], x["S"], x["Vh"])
        if x.get("__basis_svd__"):
            return BasisSVD.from_dict(x)
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def state_to_dict(state: ServerState) -> dict:
    return {
        "round": state.round,
        "rank": state.rank,
        "lora": {"alpha": float(state.lora.alpha), "rslora": bool(state.lora.rslora)},
        "seed": state.seed,
        "adapters": _encode(dict(state.adapters)),
        "dense": dict(state.dense),
        "base_delta": _encode(dict(state.base_delta)),
        "extra": _encode(dict(state.extra)),
        "info": _encode(dict(state.info)),
    }


def state_from_dict(d: dict) -> ServerState:
    """The state ``state_to_dict`` wrote; a ValueError naming what is wrong where the dict is not one
    (a missing key, factors that do not chain, non-finite values, a scaling other than the spec's)."""
    missing = sorted({"round", "rank", "lora", "seed", "adapters", "dense", "base_delta", "extra", "info"} - set(d))
    if missing:
        raise ValueError(f"server state lacks {missing}")
    state = _state(d)
    for name, a in state.adapters.items():
        if not isinstance(a, Adapter):
            raise ValueError(f"adapter {name!r} is {type(a).__name__}, not an adapter")
        if a.B.dim() != 2 or a.A.dim() != 2 or a.B.shape[1] != a.A.shape[0]:
            raise ValueError(f"adapter {name!r}: B {tuple(a.B.shape)} and A {tuple(a.A.shape)} do not chain")
        if not (bool(torch.isfinite(a.B).all()) and bool(torch.isfinite(a.A).all())):
            raise ValueError(f"adapter {name!r} holds NaN or Inf")
        if abs(a.scale - state.lora.scale(a.rank)) > 1e-6 * state.lora.scale(a.rank):
            raise ValueError(f"adapter {name!r}: scaling {a.scale} is not the spec's {state.lora.scale(a.rank)} at rank {a.rank}")
    for name, f in state.base_delta.items():
        if not isinstance(f, Factored) or f.L.shape[1] != f.R.shape[0]:
            raise ValueError(f"base delta {name!r} is not a factored matrix whose factors chain")
    return state


def _state(d: dict) -> ServerState:
    return ServerState(
        round=int(d["round"]),
        rank=int(d["rank"]),
        lora=LoraSpec(**d["lora"]),
        adapters=_decode(d["adapters"]),
        dense=dict(d["dense"]),
        base_delta=_decode(d["base_delta"]),
        extra=_decode(d["extra"]),
        info=_decode(d["info"]),
        seed=int(d["seed"]),
    )
