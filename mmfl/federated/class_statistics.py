"""Class statistics of frozen features for the server's virtual features (:mod:`.virtual_features`): what a client
sends of each class it holds (:func:`summarize`), their sums over clients (:class:`ClassStatistics`), the pooled
within-class covariances, and draws from the classes' Gaussians."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfl.federated.scopes import scope_prefix


@dataclass
class ClassSummary:
    """What one client sends of one class it holds: the count n, ``Σx`` [D], and either ``Σxxᵀ`` as a factor
    ``F`` [D, r] with ``F Fᵀ = Σxxᵀ`` (r its rank, at most n) or, for ``isotropic``, only ``Σ‖x‖²``.

    ``F`` is ``Σxxᵀ``'s own eigenvectors (each signed so its largest entry is positive) scaled by the square roots of
    its eigenvalues — a function of ``Σxxᵀ`` alone, so it tells the server no more than the matrix, in D·r numbers
    instead of the D(D + 1)/2 of its upper triangle (r = 16 of D = 1280: 174 kB with the count and ``Σx``, instead of
    6.6 MB, in float64).
    """

    count: int
    total: Tensor  # [D] float64
    sqnorm: float
    factor: Tensor | None  # [D, r] float64; None: isotropic

    def nbytes(self) -> int:
        """Bytes sent in float64: the count, ``Σx`` and the factor — or the upper triangle, when that is smaller —
        or ``Σ‖x‖²`` alone."""
        d = self.total.shape[0]
        second = 1 if self.factor is None else min(d * self.factor.shape[1], d * (d + 1) // 2)
        return 8 * (1 + d + second)


def summarize(features: Tensor, labels: Tensor, full: bool = True) -> dict[int, ClassSummary]:
    """One client's :class:`ClassSummary` per class it holds, from its ``features`` [N, D] and ``labels`` [N];
    ``full=False``: without the second moments' factor (``isotropic``)."""
    x = features.to(torch.float64)  # [N, D]
    out = {}
    for c in labels.unique().tolist():
        xs = x[labels == c]  # [n, D]
        factor = None
        if full:  # Σxxᵀ = xsᵀ xs = U Λ Uᵀ and F = U √Λ, from the smaller of the two Gram matrices
            small = xs.shape[0] <= xs.shape[1]  # xs xsᵀ = V Λ Vᵀ [n, n] gives F = xsᵀ V (F Fᵀ = Σxxᵀ, FᵀF = Λ)
            ev, vec = torch.linalg.eigh(xs @ xs.T if small else xs.T @ xs)  # [m], [m, m]; m = min(n, D)
            keep = ev > ev.max().clamp_min(0) * 1e-12  # directions with no spread carry nothing
            factor = xs.T @ vec[:, keep] if small else vec[:, keep] * ev[keep].sqrt()  # [D, r]
            sign = factor.gather(0, factor.abs().argmax(0, keepdim=True)).sign()  # [1, r]
            factor = factor * torch.where(sign == 0, 1.0, sign)
        out[c] = ClassSummary(xs.shape[0], xs.sum(0), float(xs.square().sum()), factor)
    return out


class ClassStatistics:
    """Per-class sums of features: counts, ``Σx`` [C, D], ``Σ‖x‖²`` [C] and, when ``full``, ``Σxxᵀ`` [C, D, D]
    (float64), which add up over clients.

    Args:
        num_classes: C.
        dim: D.
        full: keep the sums of outer products (every covariance needs them but ``isotropic``'s).
    """

    def __init__(self, num_classes: int, dim: int, full: bool = True) -> None:
        self.count = torch.zeros(num_classes, dtype=torch.long)  # [C]
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64)  # [C, D]
        self.sqnorm = torch.zeros(num_classes, dtype=torch.float64)  # [C]
        self.outer = torch.zeros(num_classes, dim, dim, dtype=torch.float64) if full else None  # [C, D, D]

    def add(self, features: Tensor, labels: Tensor) -> None:
        """Add examples: ``features`` [N, D], ``labels`` [N] (class indices)."""
        x = features.to(torch.float64)  # [N, D]
        for c in labels.unique().tolist():
            xs = x[labels == c]  # [n_c, D]
            self.count[c] += xs.shape[0]
            self.sum[c] += xs.sum(0)
            self.sqnorm[c] += xs.square().sum()
            if self.outer is not None:
                self.outer[c] += xs.T @ xs

    def add_summary(self, c: int, summary: ClassSummary) -> None:
        """Add one client's :class:`ClassSummary` of class ``c`` (its factor's ``F Fᵀ`` to ``Σxxᵀ``)."""
        self.count[c] += summary.count
        self.sum[c] += summary.total
        self.sqnorm[c] += summary.sqnorm
        if self.outer is not None:
            if summary.factor is None:
                raise ValueError("a summary without Σxxᵀ's factor cannot fill full class statistics")
            self.outer[c] += summary.factor @ summary.factor.T

    def variance(self, c: int) -> float:
        """Class ``c``'s variance averaged over dimensions, ``tr(S_c) / ((n_c − 1) · D)`` with ``tr(S_c) = Σ‖x‖² −
        n_c ‖μ_c‖²`` (0 for a class seen once)."""
        n = int(self.count[c])
        if n < 2:
            return 0.0
        mu = self.sum[c] / n  # [D]
        trace = float(self.sqnorm[c] - n * mu.square().sum())
        return max(trace, 0.0) / ((n - 1) * mu.shape[0])

    def isotropic(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Per class with examples: (mean μ [D], the standard deviation √v_c as a 0-d factor) — N(μ_c, v_c I),
        drawn by :func:`draw` as μ + √v_c · z with z ~ N(0, I_D)."""
        out = {}
        for c in torch.nonzero(self.count).flatten().tolist():
            mu = self.sum[c] / int(self.count[c])  # [D]
            out[c] = (mu, mu.new_tensor(self.variance(c)).sqrt())
        return out

    def scatter(self, c: int) -> Tensor:
        """Class ``c``'s scatter ``Σ (x − μ_c)(x − μ_c)ᵀ = Σxxᵀ − n_c μ_c μ_cᵀ`` [D, D] (0 for a class seen once)."""
        n = int(self.count[c])
        mu = self.sum[c] / n  # [D]
        return self.outer[c] - n * torch.outer(mu, mu)

    def within(self) -> tuple[Tensor, int]:
        """The within-class scatter summed over the classes with examples [D, D], and its degrees of freedom
        ``Σ_c (n_c − 1)`` (the pooled within-class covariance is their quotient)."""
        total = torch.zeros_like(self.outer[0])  # [D, D]
        dof = 0
        for c in torch.nonzero(self.count).flatten().tolist():
            total += self.scatter(c)
            dof += int(self.count[c]) - 1
        return total, dof

    def gaussians(self, pooled: Tensor | None = None, prior: float = 0.0) -> dict[int, tuple[Tensor, Tensor]]:
        """Per class with examples: (mean μ [D], a factor L [D, r] with L Lᵀ the covariance, r its rank);
        μ + L z with z ~ N(0, I_r) is a draw from N(μ, Σ).

        Args:
            pooled: a covariance [D, D] to shrink each class's toward; None: the class's own, unbiased (a class
                seen once has r = 0: its one feature).
            prior: the examples' worth of ``pooled`` in each class's: ``Σ_c = (S_c + prior · pooled) /
                (n_c − 1 + prior)`` with ``S_c`` the class's :meth:`scatter`.
        """
        out = {}
        for c in torch.nonzero(self.count).flatten().tolist():
            n = int(self.count[c])
            mu = self.sum[c] / n  # [D]
            if pooled is not None:
                cov = (self.scatter(c) + prior * pooled) / (n - 1 + prior)  # [D, D]
            elif n < 2:
                out[c] = (mu, mu.new_zeros(mu.shape[0], 0))
                continue
            else:
                cov = self.scatter(c) / (n - 1)  # [D, D]
            ev, vec = torch.linalg.eigh((cov + cov.T) / 2)  # ascending
            keep = ev > ev.max().clamp_min(0) * 1e-10  # the covariance's rank is at most n - 1 (+ the pool's)
            out[c] = (mu, vec[:, keep] * ev[keep].sqrt())  # [D, r]
        return out


def pooled_covariances(stats: dict[tuple[str, str], ClassStatistics], scope: str) -> dict[tuple[str, str], Tensor]:
    """For each (task, modality) group, the within-class covariance pooled over the groups that share its key of
    ``scope`` (``task_modality``: its own classes only; ``global``: every group's): ``Σ_g W_g / Σ_g dof_g`` [D, D]
    with :meth:`ClassStatistics.within`'s scatter and degrees of freedom. A group whose pool has no degree of
    freedom (every class seen once) is left out.

    Raises:
        ValueError: groups of one pool whose features differ in width.
    """
    within = {g: s.within() for g, s in stats.items()}
    pools: dict[str, list[tuple[str, str]]] = {}
    for task, modality in stats:
        pools.setdefault(scope_prefix(scope, task, modality), []).append((task, modality))
    out = {}
    for members in pools.values():
        widths = {within[g][0].shape[0] for g in members}
        if len(widths) > 1:
            raise ValueError(
                f"federation.virtual_features.covariance={scope!r} pools groups whose features differ in width "
                f"({', '.join(f'{t}/{m}: {within[(t, m)][0].shape[0]}' for t, m in members)}): pool over a narrower "
                "scope"
            )
        dof = sum(within[g][1] for g in members)
        if dof > 0:
            total = sum(within[g][0] for g in members)  # [D, D]
            out.update({g: total / dof for g in members})
    return out


def draw(
    gaussians: dict[int, tuple[Tensor, Tensor]], samples: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``samples`` draws per class: features [C'·samples, D] (float32, class by class) and their labels. A class's
    factor is [D, r] (``μ + L z``, z ~ N(0, I_r)) or 0-d, a standard deviation s (``μ + s z``, z ~ N(0, I_D))."""
    xs, ys = [], []
    for c, (mu, factor) in sorted(gaussians.items()):
        if factor.dim() == 0:  # isotropic
            z = torch.randn(samples, mu.shape[0], generator=generator, dtype=torch.float64)  # [S, D]
            xs.append(mu + factor * z)  # [S, D]
        else:
            z = torch.randn(samples, factor.shape[1], generator=generator, dtype=torch.float64)  # [S, r]
            xs.append(mu + z @ factor.T)  # [S, D]
        ys.append(torch.full((samples,), c, dtype=torch.long))
    return torch.cat(xs).float(), torch.cat(ys)
