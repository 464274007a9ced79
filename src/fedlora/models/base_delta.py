"""Where the base deltas ΔW0 live: folded into W0, or beside it as frozen factors.

Exact methods (fedex, hexa, flora) move part of every round's update into the
frozen base, W0 ← W0 + ΔW0_t, and HEXA gives some clients a temporary frozen
delta of their own. :class:`BaseDeltas` holds both, per adapted module, in one
of two places (``model.base_delta``):

``fold``
    ΔW0_t is added to the dense W0 in place: 2·m·n·k flops per module and round,
    no cost afterwards. Only a full-precision W0 can take it exactly.

``factored``
    W0 is never written. The module computes y = W0·x + L·(R·x), with
    Σ_t ΔW0_t = L·R kept as frozen float32 factors (L m×k, R k×n) on the model's
    device: a forward hook on the base layer adds them, so the same code serves
    ``nn.Linear``, GPT-2's ``Conv1D`` (no transposition to get wrong) and
    bitsandbytes' 4-bit and 8-bit layers. Rounding ΔW0 into a 4-bit W0 would lose
    it to the quantization grid; beside W0 it stays exact to float32 round-off.
    Each round appends the new factors (exact, no flops); when k has doubled
    since the last compression the sum is cut back to its numerical rank (singular values
    below 1e-7·σ₁ dropped): the compressed prefix is already U·S with orthonormal U and V, so
    only the appended factors are orthogonalised against it (``SVD.plus``: GEMMs and a QR as
    wide as what was appended, an SVD of the k×k core in float64); a side loaded from a checkpoint
    saved before its singular values were kept takes a QR of both whole factors instead. Cost per token:
    2·k·(m+n) flops more than W0 alone; memory k·(m+n) numbers. When the
    compressed rank reaches the point where k·(m+n) ≥ m·n/2, factors no longer
    pay: a full-precision W0 absorbs them (one fold) and the side empties; a
    quantized W0 gets a dense float32 side matrix D instead (y = W0·x + D·x),
    whose memory, m·n numbers, is the price of exactness on a quantized base.

Temporary deltas (``with deltas.added(…)``: HEXA's client-only delta, the global
model's G for evaluation) always go beside W0, whatever the mode: nothing is
copied or restored, and W0 is never touched for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import SVD, Factored, fold_delta
from ..core.parallel import per_module

__all__ = ["BaseDeltas", "BASE_DELTA_MODES", "is_quantized"]

BASE_DELTA_MODES = ("auto", "fold", "factored")
RTOL = 1e-7  # singular values ≤ RTOL·σ₁ are float32 round-off, dropped at compression


def is_quantized(layer: nn.Module) -> bool:
    """Whether a base layer's weight is stored quantized (bitsandbytes 4-bit or 8-bit)."""
    return not layer.weight.dtype.is_floating_point


class _Side:
    """One module's frozen side term: factors (L, R) or a dense D, plus temporary factors."""

    __slots__ = ("L", "R", "D", "compressed_rank", "S", "extra")

    def __init__(self) -> None:
        self.L: Tensor | None = None
        self.R: Tensor | None = None
        self.D: Tensor | None = None
        self.compressed_rank = 0
        self.S: Tensor | None = None  # singular values of the first compressed_rank columns (L = U·S), when known
        self.extra: list[tuple[Tensor, Tensor]] = []

    def empty(self) -> bool:
        return self.L is None and self.D is None and not self.extra

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        autocast = torch.is_autocast_enabled(x.device.type)
        add = None
        for L, R in ([(self.L, self.R)] if self.L is not None else []) + self.extra:
            h = F.linear(F.linear(x if autocast else x.to(R.dtype), R), L)  # (x·Rᵀ)·Lᵀ: never L·R
            add = h if add is None else add + h
        if self.D is not None:
            h = F.linear(x if autocast else x.to(self.D.dtype), self.D)
            add = h if add is None else add + h
        return output if add is None else output + add.to(output.dtype)


class BaseDeltas:
    """The base deltas of every adapted module of one model (see the module docstring)."""

    def __init__(self, layers: Mapping[str, nn.Module], fan_in_fan_out: Mapping[str, bool], mode: str = "fold"):
        self.layers = dict(layers)  # module name → its frozen base layer (nn.Linear, Conv1D, bnb Linear4bit, …)
        self.fan_in_fan_out = dict(fan_in_fan_out)
        self.quantized = {m for m, layer in self.layers.items() if is_quantized(layer)}
        if mode == "auto":
            mode = "factored" if self.quantized else "fold"
        if mode not in ("fold", "factored"):
            raise ValueError(f"model.base_delta must be one of {', '.join(BASE_DELTA_MODES)}, got {mode!r}")
        if mode == "fold" and self.quantized:
            raise ValueError("model.base_delta=fold cannot add base deltas to a quantized W0 exactly; use factored (or auto)")
        self.mode = mode
        self.sides: dict[str, _Side] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    # ----------------------------------------------------------------- sides
    def _side(self, module: str) -> _Side:
        if module not in self.sides:
            self.sides[module] = _Side()
            self._hooks[module] = self.layers[module].register_forward_hook(self.sides[module])
        return self.sides[module]

    def _drop_if_empty(self, module: str) -> None:
        if module in self.sides and self.sides[module].empty():
            del self.sides[module]
            self._hooks.pop(module).remove()

    def _device_factors(self, module: str, delta: Factored) -> tuple[Tensor, Tensor]:
        (m, n), layer = delta.shape, self.layers[module]
        if hasattr(layer, "in_features"):  # nn.Linear and bitsandbytes' layers (whose weight is packed)
            out_in = (layer.out_features, layer.in_features)
        else:  # GPT-2's Conv1D stores W as in×out
            out_in = tuple(layer.weight.shape[::-1]) if self.fan_in_fan_out[module] else tuple(layer.weight.shape)
        if out_in != (m, n):
            raise ValueError(f"module {module!r}: a {m}×{n} base delta does not fit its {out_in[0]}×{out_in[1]} weight")
        dev = layer.weight.device
        return delta.L.to(dev, torch.float32).contiguous(), delta.R.to(dev, torch.float32).contiguous()

    # ------------------------------------------------------------- permanent
    def fold(self, deltas: Mapping[str, Factored]) -> None:
        """W_eff += ΔW0 for every module, for good (the round's broadcast base delta)."""
        todo = {module: delta for module, delta in deltas.items() if delta.inner_dim}
        if self.mode == "fold":  # one GEMM per module, which BLAS already spreads over the cores
            for module, delta in todo.items():
                self._fold_dense(module, delta)
            return
        for module in todo:  # sides and hooks are created here, the per-module work below runs side by side
            self._side(module)
        per_module(lambda module: self._append(module, todo[module]), todo)
        for module in todo:
            self._drop_if_empty(module)

    def _append(self, module: str, delta: Factored) -> None:
        side = self.sides[module]
        L, R = self._device_factors(module, delta)
        if side.D is not None:  # already dense beside a quantized W0
            side.D.addmm_(L, R)
            return
        side.L = L if side.L is None else torch.cat([side.L, L], dim=1)
        side.R = R if side.R is None else torch.cat([side.R, R], dim=0)
        if side.L.shape[1] > 2 * side.compressed_rank:
            self._compress(module, side)

    def _fold_dense(self, module: str, delta: Factored) -> None:
        fold_delta(self.layers[module].weight.data, delta, fan_in_fan_out=self.fan_in_fan_out[module])

    def _compress(self, module: str, side: _Side) -> None:
        """Σ ΔW0 cut back to its numerical rank; dense (or into W0) once factors stop paying."""
        assert side.L is not None and side.R is not None
        dev = side.L.device
        work = torch.device("cpu") if dev.type == "mps" else dev  # MPS has no float64 for the core SVD
        L, R, c = side.L.to(work), side.R.to(work), side.compressed_rank
        if side.S is not None and c == side.S.numel() > 0:  # the first c columns are U·S from the last compression
            S = side.S.to(work)
            svd = SVD(L[:, :c] / S, S, R[:c]).plus(S.double(), Factored(L[:, c:], R[c:]), rtol=RTOL)  # only the appended part is orthogonalised
        else:
            svd = Factored(L, R).svd(rtol=RTOL)  # QRs in float32, the k×k core in float64
        small, side.S = svd.factored(), svd.S
        (m, n), k = small.shape, small.inner_dim
        if k * (m + n) * 2 >= m * n:
            side.L = side.R = side.S = None
            side.compressed_rank = 0
            if module in self.quantized:
                side.D = small.dense().to(dev, torch.float32)
            else:
                self._fold_dense(module, small.to(torch.float32))
            return  # the emptied side is dropped by the caller (its hook removed outside the workers)
        side.L, side.R = small.L.to(dev, torch.float32), small.R.to(dev, torch.float32)
        side.compressed_rank = k

    # ------------------------------------------------------------- temporary
    @contextmanager
    def added(self, deltas: Mapping[str, Factored]) -> Iterator[None]:
        """W_eff += Δ inside the block only; W0 and the permanent side are never written."""
        pushed = []
        try:
            for module, delta in deltas.items():
                if delta.inner_dim == 0:
                    continue
                self._side(module).extra.append(self._device_factors(module, delta))
                pushed.append(module)
            yield
        finally:
            for module in pushed:
                self.sides[module].extra.pop()
                self._drop_if_empty(module)

    # ------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Tensor]:
        """Everything needed to rebuild W_eff on the pretrained W0, as CPU tensors:
        the full-precision W0 of each adapted module (folds change it) and each side term."""
        out = {f"{m}/W": layer.weight.detach().to("cpu", copy=True) for m, layer in self.layers.items() if m not in self.quantized}
        for m, side in self.sides.items():
            for key in ("L", "R", "D", "S"):
                t = getattr(side, key)
                if t is not None:
                    out[f"{m}/{key}"] = t.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """The inverse of :meth:`state`. A checkpoint written before side terms existed
        ({module: W0}) loads too."""
        if state and not any("/" in k and k.rsplit("/", 1)[1] in ("W", "L", "R", "D") for k in state):
            state = {f"{m}/W": w for m, w in state.items()}
        for m in list(self.sides):
            s = self.sides[m]
            s.L = s.R = s.D = s.S = None
            s.compressed_rank = 0
            self._drop_if_empty(m)
        for key, t in state.items():
            m, part = key.rsplit("/", 1)
            if m not in self.layers:
                raise ValueError(f"base state names module {m!r}, which this model does not adapt")
            if part == "W":
                self.layers[m].weight.copy_(t)
                continue
            side = self._side(m)
            setattr(side, part, t.to(self.layers[m].weight.device, torch.float32))
        for side in self.sides.values():  # the compressed prefix: where S says (a resumed run compresses as before), else all of L
            if side.L is not None:
                side.compressed_rank = side.S.numel() if side.S is not None else side.L.shape[1]

    @torch.no_grad()
    def effective_weight(self, module: str) -> Tensor:
        """W0 + every side term (temporary ones included) as one dense weight in the base
        layer's storage layout, float64 on the CPU: for tests and diagnostics only."""
        layer = self.layers[module]
        if module in self.quantized:
            raise ValueError(f"module {module!r} is quantized: its W0 has no exact dense form")
        w = layer.weight.detach().to("cpu", torch.float64)
        side = self.sides.get(module)
        if side is not None:
            terms = ([(side.L, side.R)] if side.L is not None else []) + side.extra
            delta = sum((L.to("cpu", torch.float64) @ R.to("cpu", torch.float64) for L, R in terms), torch.zeros(()))
            if side.D is not None:
                delta = delta + side.D.to("cpu", torch.float64)
            w = w + (delta.T if self.fan_in_fan_out[module] else delta)
        return w

    def side_numel(self) -> int:
        """Numbers held beside W0 (factors or dense side matrices), temporary ones excluded."""
        return sum(sum(t.numel() for t in (s.L, s.R, s.D) if t is not None) for s in self.sides.values())
