"""A thin SVD kept as orthonormal bases and small rotations: M = Q·U_c·diag(Σ)·V_cᵀ·Pᵀ.

FedHL's server keeps its untruncated global update W_t as a thin SVD and adds each
round's client changes to it (:meth:`SVD.plus`). Writing the new singular vectors out,
U' = [U, Q_X]·U_k, costs an m×(a+b)×(a+b) GEMM per side: a third of the round at LLaMA
widths. Kept as the basis [Q, Q_X] and the (a+b)×k rotation U_k, they cost nothing: the
next round projects its changes against the basis (the same span as U), and only the top
columns a client download needs are multiplied out (:meth:`truncate`).

When a truncation (``rank``/``rtol``) leaves the basis wider than the SVD by more than one
round's columns, the rotation is applied once and the basis shrinks back to U itself.

The bases grow in place: Q is a column slice of a buffer with spare capacity, and a round's
new columns are written after it (no m×(a+b) copy, no fresh pages to fault in). The buffer
records how far it is used, so a second ``plus`` on the same old SVD (an aggregation retried
on an unchanged state) finds its columns taken and copies instead: an SVD, once made, never
changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .factored import SVD, Factored, Spectrum, extend_basis

__all__ = ["BasisSVD"]


class _Columns:
    """A basis buffer: ``data`` is capacity×m, row j holding basis column j (the basis is
    ``data[:used].T``, column-major, so appending columns copies contiguous rows)."""

    def __init__(self, data: Tensor, used: int):
        self.data, self.used = data, used
        self.lock = threading.Lock()


def _buffer(Q: Tensor, capacity: int) -> tuple[Tensor, _Columns]:
    c = Q.shape[1]
    data = Q.new_empty(max(capacity, c), Q.shape[0])
    data[:c] = Q.T
    return data[:c].T, _Columns(data, c)


def _appended(Q: Tensor, buf: _Columns | None, X: Tensor) -> tuple[Tensor, _Columns]:
    """[Q, X], written into Q's buffer when Q is its used part and it has room, else into a new one."""
    c, b = Q.shape[1], X.shape[1]
    if buf is not None and c + b <= buf.data.shape[0] and Q.data_ptr() == buf.data.data_ptr():
        with buf.lock:
            mine = buf.used == c
            if mine:
                buf.used = c + b
        if mine:
            buf.data[c : c + b] = X.T
            return buf.data[: c + b].T, buf
    Q, buf = _buffer(Q, max(2 * (c + b), 64))
    buf.data[c : c + b] = X.T
    buf.used = c + b
    return buf.data[: c + b].T, buf


@dataclass(frozen=True)
class BasisSVD(Spectrum):
    """U = Q·U_c, Vᵀ = (P·V_c)ᵀ; Q (m×c) and P (n×d) orthonormal, U_c (c×k) and V_c (d×k) float64."""

    Q: Tensor
    Uc: Tensor
    S: Tensor  # (k,), decreasing, in the bases' dtype
    Vc: Tensor
    P: Tensor
    buffers: tuple[_Columns | None, _Columns | None] = field(default=(None, None), compare=False, repr=False)

    @staticmethod
    def of(svd: SVD) -> BasisSVD:
        k = svd.rank
        eye = torch.eye(k, dtype=torch.float64)
        return BasisSVD(svd.U, eye, svd.S, eye.clone(), svd.Vh.T)

    @property
    def capacity(self) -> tuple[int, int]:
        """Columns the bases' buffers hold (0 for a basis with no buffer, as ``of`` makes them)."""
        return (self.buffers[0].data.shape[0] if self.buffers[0] else 0, self.buffers[1].data.shape[0] if self.buffers[1] else 0)

    def with_capacity(self, capacity: tuple[int, int]) -> BasisSVD:
        """The same SVD with its bases in buffers of these capacities (0: kept as they are). A
        checkpoint saves the bases alone and restores them this way: the same layouts and
        strides as before, so a resumed run's products round exactly as the uninterrupted ones'."""
        out = [(X, None) if int(cap) == 0 else _buffer(X, int(cap)) for X, cap in zip((self.Q, self.P), capacity)]
        (Q, bq), (P, bp) = out
        return BasisSVD(Q, self.Uc, self.S, self.Vc, P, (bq, bp))

    def to_dict(self) -> dict:
        """Plain tensors for a checkpoint: each basis alone (not its buffer's spare rows), stored
        in its own memory order, with the buffers' capacities (see :meth:`from_dict`)."""
        out: dict = {"Uc": self.Uc, "S": self.S, "Vc": self.Vc, "capacity": list(self.capacity)}
        for key, X in (("Q", self.Q), ("P", self.P)):
            column_major = X.stride(0) == 1 and X.shape[1] > 1
            out[key], out[key + "_column_major"] = (X.T if column_major else X).clone(memory_format=torch.contiguous_format), column_major
        return out

    @staticmethod
    def from_dict(d: dict) -> BasisSVD:
        """The inverse of :meth:`to_dict`: the same layouts and strides as before saving, so a
        resumed run's products round exactly as the uninterrupted run's."""
        Q, P = ((d[k].T if d[k + "_column_major"] else d[k]) for k in ("Q", "P"))
        return BasisSVD(Q, d["Uc"], d["S"], d["Vc"], P).with_capacity(tuple(d["capacity"]))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.Q.shape[0], self.P.shape[0])

    def truncate(self, rank: int) -> SVD:
        """The top-``rank`` part as a plain SVD: O((m+n)·c·rank), the only vectors multiplied out."""
        dtype = self.Q.dtype
        return SVD(self.Q @ self.Uc[:, :rank].to(dtype), self.S[:rank], (self.P @ self.Vc[:, :rank].to(dtype)).T.contiguous())

    def svd(self) -> SVD:
        return self.truncate(self.rank)

    def factored(self) -> Factored:
        return self.svd().factored()

    def plus(
        self, weights: Tensor, update: Factored, rank: int | None = None, rtol: float | None = None, in_basis: tuple[Tensor, Tensor] | None = None
    ) -> BasisSVD:
        """:meth:`SVD.plus` (U·diag(w)·Vᵀ + L·R; ``in_basis`` parts in U's and V's coordinates),
        with the new vectors left as the basis [Q, Q_X] and a rotation."""
        (m, c), (b, n) = self.Q.shape, update.R.shape
        if self.rank == 0 or b == 0 or c + b > min(m, n):  # nothing to extend, or no room: SVD.plus's own fallback
            return BasisSVD.of(self.svd().plus(weights, update, rank=rank, rtol=rtol, in_basis=in_basis))
        QX, Uk, S, QY, Vk = extend_basis(self.Q, self.Uc, weights, self.Vc, self.P, update, rank, rtol, in_basis)
        Q, bufQ = _appended(self.Q, self.buffers[0], QX)
        P, bufP = _appended(self.P, self.buffers[1], QY)
        out = BasisSVD(Q, Uk, S.to(self.Q.dtype), Vk, P, (bufQ, bufP))
        if out.Q.shape[1] > out.rank + b or out.P.shape[1] > out.rank + b:
            return BasisSVD.of(out.svd())
        return out
