"""The regularised inverse of a Gram matrix, kept current by low-rank (Woodbury) updates.

A ridge or a shrunk covariance over ``M`` random features needs ``(G + s I)^-1`` with ``G`` the
Gram matrix of the stored rows. Factorising it anew costs ``O(M^3)`` whatever was added; the
recursive least-squares update of analytic class-incremental learning (ACIL, G-ACIL)::

    K <- K - K X^T (I + X K X^T)^-1 X K

takes ``n`` new rows ``X`` into ``K = (G + s I)^-1`` for ``O(n M^2)``, exactly (to float rounding),
so a session costs what it adds. The same identity with the sign flipped gives ``K`` without some
rows (held-out scoring) or without a low-rank term (a class-mean correction), applied to a few
vectors without ever forming the new matrix.

Held-out scores need little of ``K`` but quadratic forms ``u^T K v`` (the leverages of a fold's
rows, and its rows against the class sums). With the Cholesky factor ``K = U^T U`` they are dot
products of ``U u`` and ``U v``, and ``U`` times a block is a triangular product: about half the
work of ``K`` times it (:meth:`InverseGram.mapped`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Rows taken into the inverse at a time: bounds the n x n capacitance and the (M, n) products.
_BLOCK = 1024
# Rows of the Cholesky factor per panel of InverseGram.mapped: the zeros below the diagonal a
# panel multiplies add about _PANEL / (2 M) to the work (6% at M = 4,096), a panel a product.
_PANEL = 512

Operator = Callable[[np.ndarray], np.ndarray]
"""``z (M, m) -> A^-1 z``: an inverse applied to a block of vectors."""


def spd_inverse(system: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix (Cholesky, then its inverse: about
    two thirds of an LU inverse's work). ``system`` is overwritten."""
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(system, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"matrix not positive definite (order {info})")
    inverse, info = lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"singular factor (order {info})")
    upper = np.triu(inverse)
    return upper + np.triu(upper, 1).T


class InverseGram:
    """``K = (G + strength * I)^-1`` for the Gram ``G = sum x x^T`` of the rows added so far.

    Args:
        inverse: ``K``, symmetric ``(M, M)`` float64 (taken, not copied).
        strength: The ridge ``s`` added to the Gram's diagonal.
    """

    def __init__(self, inverse: np.ndarray, strength: float) -> None:
        self.inverse = inverse
        self.strength = float(strength)
        self._panels: list[tuple[int, np.ndarray]] | None = None

    @classmethod
    def of_gram(cls, gram: np.ndarray, strength: float) -> InverseGram:
        """From a Gram matrix (one ``O(M^3)`` factorisation; ``gram`` is not changed)."""
        system = gram + strength * np.eye(len(gram))
        return cls(spd_inverse(system), strength)

    @property
    def size(self) -> int:
        return len(self.inverse)

    def add_rows(self, rows: np.ndarray) -> None:
        """Take ``rows (n, M)`` into the Gram: ``O(n M^2)``, in blocks."""
        from scipy.linalg import cho_factor, cho_solve

        k = self.inverse
        self._panels = None
        for lo in range(0, len(rows), _BLOCK):
            x = np.asarray(rows[lo : lo + _BLOCK], dtype=np.float64)
            kx = k @ x.T  # (M, n)
            capacitance = np.eye(len(x)) + x @ kx
            k -= kx @ cho_solve(cho_factor(capacitance, overwrite_a=True), kx.T)
        # Rounding leaves K a hair off symmetric; keep it exactly so (half the cost of a copy).
        k += k.T
        k *= 0.5

    def add_gram(self, gram: np.ndarray) -> None:
        """Take rows already summed into a Gram ``(M, M)`` (by workers, one shard each):
        ``K <- (K^-1 + gram)^-1 = (I + K gram)^-1 K``, one ``O(M^3)`` solve whatever the row
        count, which beats :meth:`add_rows`' ``O(n M^2)`` once ``n`` is about ``M / 2``."""
        from scipy.linalg import solve

        self._panels = None
        system = np.eye(self.size) + self.inverse @ gram
        self.inverse = solve(system, self.inverse, overwrite_a=True, check_finite=False)
        self.inverse += self.inverse.T
        self.inverse *= 0.5

    def apply(self, z: np.ndarray) -> np.ndarray:
        """``K z`` for ``z (M, m)``."""
        return self.inverse @ z

    def mapped(self, z: np.ndarray) -> np.ndarray:
        """``U z`` for ``z (M, m)``, with ``K = U^T U`` (``U`` upper triangular, the Cholesky
        factor): ``u^T K v = (U u) . (U v)``, so quadratic forms in ``K`` cost one triangular
        product of each side, about half of ``K z``'s work."""
        z = np.asarray(z, dtype=np.float64)
        out = np.empty(z.shape)
        for lo, panel in self._upper_panels():
            np.matmul(panel, z[lo:], out=out[lo : lo + len(panel)])
        return out

    def _upper_panels(self) -> list[tuple[int, np.ndarray]]:
        """``U`` by panels of rows, each from its diagonal on (the zeros below it included):
        one Cholesky factorisation (``O(M^3 / 3)``), kept until ``K`` changes (about half an
        ``M x M`` array). Products by panels run in numpy's BLAS, as the rest of held-out
        scoring does: scipy's triangular product has a BLAS of its own, whose threads would
        compete with numpy's for the same cores."""
        if self._panels is None:
            upper = np.linalg.cholesky(self.inverse).T
            self._panels = []
            for lo in range(0, len(upper), _PANEL):
                panel = np.array(upper[lo : lo + _PANEL, lo:])
                square = panel[:, : len(panel)]
                square[np.tril_indices(len(panel), -1)] = 0.0  # below the diagonal
                self._panels.append((lo, panel))
        return self._panels

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues of the Gram (not of ``K``) and their eigenvectors: ``G = Q diag(e) Q^T``
        (one ``O(M^3)`` decomposition, for choosing a new strength)."""
        values, vectors = np.linalg.eigh(self.inverse)
        gram_values = 1.0 / np.maximum(values, 1e-300) - self.strength
        return np.maximum(gram_values, 0.0), vectors

    def gram(self) -> np.ndarray:
        """The Gram matrix recovered from ``K`` (``O(M^3)``)."""
        gram = spd_inverse(self.inverse.copy())
        gram[np.diag_indices_from(gram)] -= self.strength
        return gram

    @classmethod
    def of_eigen(cls, values: np.ndarray, vectors: np.ndarray, strength: float) -> InverseGram:
        """``(Q diag(e) Q^T + strength I)^-1`` from the Gram's eigendecomposition."""
        inverse = (vectors / (values + strength)) @ vectors.T
        return cls(inverse, strength)

    def without_rows(self, rows: np.ndarray) -> Operator:
        """``(G - X^T X + s I)^-1`` as an operator, for ``rows`` ``X`` that are in ``G``."""
        return low_rank_update(self.apply, np.asarray(rows, np.float64).T, sign=-1.0)


def low_rank_update(apply: Operator, columns: np.ndarray, sign: float) -> Operator:
    """``(A + sign * U U^T)^-1`` as an operator, given ``apply = A^-1`` and ``U = columns``
    ``(M, r)`` (Woodbury: ``O(M r)`` extra per vector after an ``r x r`` solve)."""
    if columns.shape[1] == 0:
        return apply
    au = apply(columns)  # (M, r)
    capacitance = sign * np.eye(columns.shape[1]) + columns.T @ au
    inverse_cap = np.linalg.inv(capacitance)

    def updated(z: np.ndarray) -> np.ndarray:
        return apply(z) - au @ (inverse_cap @ (au.T @ z))

    return updated
