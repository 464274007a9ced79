"""Low-rank matrices kept as factors: M = L·R, never formed densely.

Every aggregation rule in fedlora is a statement about sums of LoRA products
Σ_i c_i·s_i·B_i·A_i. This module does that algebra on the factors:

* stacking:   Σ_j c_j·L_j·R_j = [c_1·L_1, …, c_K·L_K] · [R_1; …; R_K]   (exact, O(0) flops)
* inner:      ⟨L₁R₁, L₂R₂⟩_F = Σ (L₁ᵀL₂) ∘ (R₁R₂ᵀ)                         O(k₁k₂(m+n))
* SVD:        L = Q_L·T_L, Rᵀ = Q_R·T_R (thin QR) ⇒ L·R = Q_L·(T_L·T_Rᵀ)·Q_Rᵀ,
              SVD of the small k×k core C = U_c·Σ·V_cᵀ gives U = Q_L·U_c, Vᵀ = V_cᵀ·Q_Rᵀ.
              Cost O(k²(m+n) + k³) instead of O(mn·min(m,n)) for a dense SVD.

A dense m×n tensor appears only in :meth:`Factored.dense` (tests, folding into
frozen base weights) — never on the aggregation or transport path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Factored", "SVD", "block_inner", "pairwise_inner", "stacked_grams"]


class Spectrum:
    """What the singular values S alone say (shared by :class:`SVD` and ``BasisSVD``)."""

    S: Tensor  # (k,), decreasing

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def tail_energy(self, rank: int) -> float:
        """‖M − M_rank‖_F² = Σ_{j>rank} σ_j²."""
        return float(self.S[rank:].double().square().sum())


@dataclass(frozen=True)
class SVD(Spectrum):
    """A thin SVD M = U·diag(S)·Vh with S sorted in decreasing order."""

    U: Tensor  # (m, k), orthonormal columns
    S: Tensor  # (k,)
    Vh: Tensor  # (k, n), orthonormal rows

    def truncate(self, rank: int) -> SVD:
        """The best rank-``rank`` approximation (Eckart–Young)."""
        return SVD(self.U[:, :rank], self.S[:rank], self.Vh[:rank])

    def tail(self, rank: int) -> SVD:
        """Everything the rank-``rank`` truncation drops: M − M_rank."""
        return SVD(self.U[:, rank:], self.S[rank:], self.Vh[rank:])

    def factored(self) -> Factored:
        """M as factors (U·Σ)·Vh."""
        return Factored(self.U * self.S, self.Vh)

    def plus(
        self,
        weights: Tensor,
        update: Factored,
        rank: int | None = None,
        rtol: float | None = None,
        in_basis: tuple[Tensor, Tensor] | None = None,
    ) -> SVD:
        """The thin SVD of U·diag(w)·Vh + L·R, reusing this SVD's orthonormal U and Vh.

        A QR of the stacked factors [U·diag(w), L] would redo the orthogonalisation U already has.
        Instead only L's part outside span(U) is orthogonalised (classical Gram–Schmidt against
        U, a second pass where the first cancelled most of a column, then a thin QR of what is
        left), and likewise Rᵀ against V:

            L = [U, Q_X]·[[I, C], [0, T_X]],   C = Uᵀ·L,  X = L − U·C = Q_X·T_X
            Rᵀ = [V, Q_Y]·[[I, E], [0, T_Y]],  E = Vᵀ·Rᵀ, Y = Rᵀ − V·E = Q_Y·T_Y
            U·diag(w)·Vh + L·R = [U, Q_X]·core·[V, Q_Y]ᵀ,
            core = [[diag(w), C], [0, T_X]]·[[I, E], [0, T_Y]]ᵀ   (a+b)², its SVD in float64

        ``in_basis = (P, E₀)``, when the caller knows them: L = U·P + L', Rᵀ = V·E₀ + R'ᵀ with
        ``update`` holding (L', R') (FedHL: a client's start is U's own columns, its change is
        L'); then C = P + Uᵀ·L' and only the changes are projected, which seldom cancel.

        The projections are GEMMs, so with a = rank(U), b = inner dim of L·R, the QR work falls from
        that of m×(a+b) to m×b (FedHL's global update: a grows by Σ r_i every round). Directions
        of L inside span(U) leave X ≈ 0, whose Q columns then carry singular values of round-off
        size, removed by ``rtol``. Falls back to the stacked SVD when a + b exceeds min(m, n).
        """
        (m, a), (b, n) = self.U.shape, update.R.shape
        if a == 0 or b == 0 or a + b > min(m, n):
            full = update
            if in_basis is not None:
                P, E0 = in_basis
                full = Factored(update.L + self.U @ P.to(update.L.dtype), (self.Vh.T @ E0.to(update.R.dtype) + update.R.T).T)
            return Factored.stack([Factored(self.U * weights.to(self.U.dtype), self.Vh), full]).svd(rank=rank, rtol=rtol)
        eye = torch.eye(a, dtype=torch.float64)
        QX, Uk, S, QY, Vk = extend_basis(self.U, eye, weights, eye, self.Vh.T, update, rank, rtol, in_basis)
        dtype = self.U.dtype
        Uk, Vk = Uk.to(dtype), Vk.to(dtype)
        U_new = torch.addmm(self.U @ Uk[:a], QX, Uk[a:])
        V_new = torch.addmm(self.Vh.T @ Vk[:a], QY, Vk[a:])
        return SVD(U_new, S.to(dtype), V_new.T.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.Vh.shape[1])


def extend_basis(
    Q: Tensor,
    Uc: Tensor,
    weights: Tensor,
    Vc: Tensor,
    P: Tensor,
    update: Factored,
    rank: int | None,
    rtol: float | None,
    in_basis: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The arithmetic of :meth:`SVD.plus` for M = Q·U_c·diag(w)·V_cᵀ·Pᵀ with orthonormal bases
    Q (m×c), P (n×d) and rotations U_c (c×k), V_c (d×k) in float64 (U = Q·U_c; plain SVDs pass
    U_c = V_c = I). Returns (Q_X, U_k, Σ, Q_Y, V_k): the SVD of M + L·R is
    [Q, Q_X]·U_k·diag(Σ)·V_kᵀ·[P, Q_Y]ᵀ, with U_k, V_k in float64."""
    dtype = Q.dtype
    L, Rt = update.L.to(dtype), update.R.T.to(dtype)
    C, X = _project_out(Q, L)
    E, Y = _project_out(P, Rt)
    if in_basis is not None:
        C = C + (Uc @ in_basis[0].double()).to(dtype)
        E = E + (Vc @ in_basis[1].double()).to(dtype)
    QX, TX = torch.linalg.qr(X)  # explicit Q: two GEMMs beat applying reflectors to (a+b) columns
    QY, TY = torch.linalg.qr(Y)
    (c, k), d, b = Uc.shape, Vc.shape[0], L.shape[1]
    TL = torch.zeros(c + b, k + b, dtype=torch.float64)
    TL[:c, :k] = Uc * weights.double()
    TL[:c, k:] = C.double()
    TL[c:, k:] = TX.double()
    TR = torch.zeros(d + b, k + b, dtype=torch.float64)
    TR[:d, :k] = Vc
    TR[:d, k:] = E.double()
    TR[d:, k:] = TY.double()
    Uk, S, Vkh = torch.linalg.svd(TL @ TR.T, full_matrices=False)
    keep = _kept(S, rank, rtol)
    return QX, Uk[:, :keep], S[:keep], QY, Vkh[:keep].T


def _project_out(Q: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """(C, X − Q·C) with C = Qᵀ·X for orthonormal Q: classical Gram–Schmidt, and a second pass
    when the first removed more than half of some column's norm ("twice is enough": after such a
    cancellation round-off leaves a part in span(Q) that the second pass removes).

    The remainder comes back column-major, (Xᵀ − Cᵀ·Qᵀ)ᵀ: the thin QR that follows copies it
    for LAPACK without transposing, and hands back a column-major Q whose columns a basis
    buffer (``core/basis_svd.py``) appends as contiguous rows."""
    C = Q.T @ X
    Y = torch.addmm(X.T, C.T, Q.T, alpha=-1.0).T
    if bool((Y.norm(dim=0) < 0.5 * X.norm(dim=0)).any()):
        C2 = Q.T @ Y
        return C + C2, torch.addmm(Y.T, C2.T, Q.T, alpha=-1.0).T
    return C, Y


def _kept(S: Tensor, rank: int | None, rtol: float | None) -> int:
    """How many singular values survive ``rtol`` (relative to σ₁) and ``rank``."""
    keep = S.numel()
    if rtol is not None and keep:
        keep = int((S > rtol * S[0]).sum()) if S[0] > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    return keep


class Factored:
    """A matrix M = L·R of shape (m, n) held as L (m×k) and R (k×n)."""

    __slots__ = ("L", "R")

    def __init__(self, L: Tensor, R: Tensor):
        if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
            raise ValueError(f"factors do not chain: L {tuple(L.shape)} · R {tuple(R.shape)}")
        self.L = L
        self.R = R

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple[int, int]:
        return (self.L.shape[0], self.R.shape[1])

    @property
    def inner_dim(self) -> int:
        """k, the number of stacked rank-one terms (an upper bound on the rank)."""
        return self.L.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.L.dtype

    def numel(self) -> int:
        """Numbers needed to transport M in this form: k·(m+n)."""
        return self.L.numel() + self.R.numel()

    @staticmethod
    def zeros(m: int, n: int, dtype: torch.dtype = torch.float32) -> Factored:
        return Factored(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, n, dtype=dtype))

    # ---------------------------------------------------------------- algebra
    @staticmethod
    def stack(terms: Sequence[Factored], coefs: Sequence[float] | None = None) -> Factored:
        """Σ_j c_j·M_j exactly, as one factored matrix of inner dimension Σ_j k_j."""
        if not terms:
            raise ValueError("stack needs at least one term")
        shape = terms[0].shape
        for t in terms:
            if t.shape != shape:
                raise ValueError(f"cannot stack matrices of shapes {shape} and {t.shape}")
        coefs = [1.0] * len(terms) if coefs is None else list(coefs)
        L = torch.cat([c * t.L for c, t in zip(coefs, terms)], dim=1)
        R = torch.cat([t.R for t in terms], dim=0)
        return Factored(L, R)

    def __add__(self, other: Factored) -> Factored:
        return Factored.stack([self, other])

    def __sub__(self, other: Factored) -> Factored:
        return Factored.stack([self, other], [1.0, -1.0])

    def __neg__(self) -> Factored:
        return Factored(-self.L, self.R)

    def __mul__(self, c: float) -> Factored:
        return Factored(c * self.L, self.R)

    __rmul__ = __mul__

    def t(self) -> Factored:
        """Mᵀ = Rᵀ·Lᵀ."""
        return Factored(self.R.T, self.L.T)

    def to(self, dtype: torch.dtype) -> Factored:
        return Factored(self.L.to(dtype), self.R.to(dtype))

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The m×n matrix. Only for folding into dense base weights and for tests."""
        L, R = (self.L, self.R) if dtype is None else (self.L.to(dtype), self.R.to(dtype))
        return L @ R

    # ----------------------------------------------------------------- norms
    def inner(self, other: Factored) -> float:
        """⟨M₁, M₂⟩_F = trace(M₁ᵀM₂) = Σ (L₁ᵀL₂) ∘ (R₁R₂ᵀ), accumulated in float64."""
        if self.shape != other.shape:
            raise ValueError(f"inner product of shapes {self.shape} and {other.shape}")
        gl = self.L.double().T @ other.L.double()
        gr = self.R.double() @ other.R.double().T
        return float((gl * gr).sum())

    def norm(self) -> float:
        """‖M‖_F, clamped at zero against round-off."""
        return max(self.inner(self), 0.0) ** 0.5

    # ------------------------------------------------------------------- SVD
    def svd(self, rank: int | None = None, rtol: float | None = None) -> SVD:
        """Exact thin SVD of L·R through QR of the factors.

        ``rank`` keeps the top singular triplets only; ``rtol`` drops singular
        values ≤ rtol·σ₁ (numerical zeros). The core SVD runs in float64, the
        QRs and the final products in the factors' dtype.
        """
        m, n = self.shape
        dtype = self.dtype
        if self.inner_dim == 0:
            return SVD(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(0, n, dtype=dtype))
        QL, TL = torch.linalg.qr(self.L)  # (m, a), (a, k)
        QR, TR = torch.linalg.qr(self.R.T)  # (n, b), (b, k)
        core = TL.double() @ TR.double().T  # (a, b)
        Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
        keep = _kept(S, rank, rtol)
        U = QL @ Uc[:, :keep].to(dtype)
        Vh = Vch[:keep].to(dtype) @ QR.T
        return SVD(U, S[:keep].to(dtype), Vh)

    def truncated_svd(self, rank: int, rtol: float | None = None) -> tuple[SVD, float]:
        """``svd(rank=rank, rtol=rtol)`` and the energy the truncation drops, ‖M − M_k‖_F² = Σ_{j≥k} σ_j²
        (k the values kept: at most ``rank``, and with ``rtol`` none at or below rtol·σ₁).

        The same QRs and core SVD as :meth:`svd`, but Q_L and Q_R stay as Householder
        reflectors (geqrf) applied to the top ``rank`` core vectors only (ormqr): Q is
        never formed, and U, Vh cost O(k·rank·(m+n)) instead of O(k²(m+n)).
        """
        if self.inner_dim == 0:
            return self.svd(rank=rank), 0.0
        (m, n), k, dtype = self.shape, self.inner_dim, self.dtype
        hL, tauL = torch.geqrf(self.L)  # L = Q_L·T_L, Q_L as reflectors
        hR, tauR = torch.geqrf(self.R.T)
        core = hL[: min(m, k)].triu().double() @ hR[: min(n, k)].triu().double().T
        Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
        S = S.to(dtype)
        keep = _kept(S, rank, rtol)
        U = torch.ormqr(hL, tauL, _pad_rows(Uc[:, :keep].to(dtype), m))
        Vh = torch.ormqr(hR, tauR, _pad_rows(Vch[:keep].T.to(dtype), n)).T.contiguous()
        return SVD(U, S[:keep], Vh), float(S[keep:].double().square().sum())

    def grams(self) -> tuple[Tensor, Tensor]:
        """(LᵀL, R·Rᵀ) in float64: k×k each, O(k²(m+n)) flops."""
        return stacked_grams([self.L], [self.R])

    def top_svd(self, rank: int, grams: tuple[Tensor, Tensor] | None = None) -> SVD:
        """The top-``rank`` singular triplets of M = L·R without a QR of the m×k factors.

        From the float64 Grams G_L = LᵀL = W_L·Λ_L·W_Lᵀ and G_R = R·Rᵀ = W_R·Λ_R·W_Rᵀ
        (``grams``, when the caller already has them): L = Q_L·Λ_L^½·W_Lᵀ and R = W_R·Λ_R^½·Q_Rᵀ
        with Q_L = L·W_L·Λ_L^-½ and Q_R orthonormal, so M = Q_L·C·Q_Rᵀ with the k×k core
        C = Λ_L^½·W_Lᵀ·W_R·Λ_R^½, and C = U_c·Σ·V_cᵀ gives M's top subspaces:

            span(U_r) = span(L·W_L·Λ_L^-½·U_c[:, :r]),   span(V_r) = span(Rᵀ·W_R·Λ_R^-½·V_c[:, :r]).

        A Gram squares the condition number, so these m×r and n×r bases are then made
        orthonormal (thin QRs of ``rank`` columns, not k) and the SVD is finished by a
        Rayleigh–Ritz step on them, which costs O(k·r·(m+n)):

            Q_Uᵀ·M·Q_V = (Q_Uᵀ·L)·(R·Q_V) = U'·Σ·V'ᵀ   ⇒   U_r = Q_U·U',  V_r = Q_V·V'.

        Eigen-directions with λ ≤ 1e-14·λ_max (σ below 1e-7 of the largest: float32
        round-off in the factors) are left out of the search, and so are singular values
        ≤ 1e-7·σ₁ (fewer than ``rank`` triplets then come back). Only the top part is returned:
        a caller that needs the rest keeps it as M − U_r·Σ_r·V_rᵀ in factored form.
        """
        m, n = self.shape
        dtype = self.dtype
        GL, GR = self.grams() if grams is None else grams
        bases = []
        for G, F in ((GL, self.L), (GR, self.R.T)):
            lam, W = torch.linalg.eigh(G)
            keep = lam > 1e-14 * float(lam[-1]) if lam.numel() and lam[-1] > 0 else torch.zeros_like(lam, dtype=torch.bool)
            bases.append((lam[keep].sqrt(), W[:, keep], F))
        (sL, WL, L), (sR, WR, Rt) = bases
        if sL.numel() == 0 or sR.numel() == 0:
            return SVD(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(0, n, dtype=dtype))
        Uc, _, Vch = torch.linalg.svd(sL[:, None] * (WL.T @ WR) * sR[None, :], full_matrices=False)
        r = min(rank, Uc.shape[1])
        QU = torch.linalg.qr(L @ (WL @ (Uc[:, :r] / sL[:, None])).to(dtype))[0]
        QV = torch.linalg.qr(Rt @ (WR @ (Vch[:r].T / sR[:, None])).to(dtype))[0]
        Up, S, Vph = torch.linalg.svd((QU.T @ L).double() @ (self.R @ QV).double(), full_matrices=False)
        keep = _kept(S, None, 1e-7)  # a σ at round-off level would leave both factors of its component zero
        return SVD(QU @ Up[:, :keep].to(dtype), S[:keep].to(dtype), (QV @ Vph[:keep].T.to(dtype)).T.contiguous())

    def compress(self, rtol: float = 1e-7) -> Factored:
        """The same matrix with the smallest inner dimension its numerical rank allows."""
        if self.inner_dim <= 1:
            return self
        return self.svd(rtol=rtol).factored()

    def __repr__(self) -> str:
        return f"Factored(shape={self.shape}, k={self.inner_dim}, dtype={self.dtype})"


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """x on top of zero rows: Q·[x; 0] is Q's leading columns times x."""
    out = x.new_zeros(rows, x.shape[1])
    out[: x.shape[0]] = x
    return out


def stacked_grams(Ls: Sequence[Tensor], Rs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Float64 Grams (LᵀL, R·Rᵀ) of L = [L_1, …, L_K] and R = [R_1; …; R_K].

    The blocks are written straight into one float64 buffer per side (no float32 stack, no
    second copy): a fresh m×k float64 tensor per module is the largest temporary an
    aggregation makes, and at LLaMA widths its page faults cost as much as the copy."""
    m, n = Ls[0].shape[0], Rs[0].shape[1]
    L = torch.empty(m, sum(x.shape[1] for x in Ls), dtype=torch.float64)
    R = torch.empty(sum(x.shape[0] for x in Rs), n, dtype=torch.float64)
    at = 0
    for Li, Ri in zip(Ls, Rs):
        k = Li.shape[1]
        L[:, at : at + k] = Li
        R[at : at + k] = Ri
        at += k
    return L.T @ L, R @ R.T


def pairwise_inner(terms: Sequence[Factored]) -> Tensor:
    """The K×K Gram matrix G_jk = ⟨M_j, M_k⟩_F of several factored matrices.

    One stacked product [L_1 … L_K]ᵀ[L_1 … L_K] and one for the R's, then each
    block's Hadamard sum: O((Σk_j)²(m+n)) flops for all K² pairs at once.
    """
    if not terms:
        return torch.zeros(0, 0, dtype=torch.float64)
    GL, GR = stacked_grams([t.L for t in terms], [t.R for t in terms])
    return block_inner(GL, GR, [t.inner_dim for t in terms])


def block_inner(GL: Tensor, GR: Tensor, sizes: Sequence[int]) -> Tensor:
    """⟨L_j·R_j, L_k·R_k⟩_F for all pairs from the stacked Grams (:func:`stacked_grams`): the sum
    of the (k_j × k_k) block of G_L ∘ G_R, segment-summing rows, then columns."""
    prod = GL * GR
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    P = torch.zeros(len(sizes), prod.shape[0], dtype=torch.float64)
    P[seg, torch.arange(prod.shape[0])] = 1.0
    return P @ prod @ P.T
