"""Server training on virtual features (CCVR's classifier calibration with virtual representations, "No Fear of
Heterogeneity", NeurIPS 2021): the server trains the merged tensors of each (task, modality) on features drawn from
its clients' class statistics.

Under label skew each client's update pulls a task's shared prompt toward telling its own few classes apart, and
merging the updates does not undo that (docs/evaluation.md, "Knowledge guidance"). With a frozen input encoder a
client's features never change, so what it holds of each class is summarised, once, by three sums of its frozen
encodings: the count ``n_c``, the sum ``Σx`` [D] and the sum of outer products ``Σxxᵀ`` [D, D] — sent as a factor
of its rank, at most the client's examples of the class (:mod:`.class_statistics`). The sums add up over clients,
so the server learns only each (task, modality)'s class means and covariances (never a client's examples); from
them it draws ``samples`` virtual features per class from N(μ_c, Σ_c) and, after every round's merge, a *virtual
client* per (task, modality) trains the merged tensors on them — the same module, loss and optimizer as a real
client, for ``epochs`` epochs. A key held by several (task, modality)s (``global`` or
``modality`` scope) takes the mean of their virtual clients' results, weighted by their virtual examples.

A class seen a few times has a covariance of rank n_c − 1 (two examples: a line). With ``covariance`` set to a scope
instead of ``class``, each class's covariance is shrunk toward the within-class covariance pooled over the (task,
modality) groups of that scope (as "Free Lunch for Few-shot Learning: Distribution Calibration", ICLR 2021, borrows
the spread of data-rich classes for few-shot ones), so a scarce group draws its virtual features with the spread
other groups' classes show — statistics the server already holds.

What it costs: the class statistics leave the clients (the server sees every class's mean and covariance in the
joint space; not with differential privacy), one pass of the frozen encoder over each labelled client's data at
the first round, and the virtual clients' training on the server every round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmfl.data.feature_cache import FeatureCache, encoded_loader
from mmfl.federated.class_statistics import ClassStatistics, draw, pooled_covariances, summarize

if TYPE_CHECKING:
    from mmfl.data.task import PreparedTask
    from mmfl.module import ClientModule

log = logging.getLogger("mmfl.federated.simulation")


@dataclass
class VirtualFeatures:
    """Server training on virtual features (recipe ``federation.virtual_features``; :mod:`.virtual_features`).

    Args:
        samples: virtual features drawn per class each round.
        epochs: epochs the server's virtual client of each (task, modality) trains on them after every merge
            (with the recipe's optimizer and batch size). 5 was chosen over 1 on the validation split of
            ``recipes/label_skew.yaml`` (mean validation accuracy 84.9 ± 2.7 against 79.8 ± 5.1, 3 seeds).
        covariance: the covariance each class's features are drawn with. ``class`` (CCVR's): the class's own, from
            its examples alone (rank at most n_c − 1: a class with 2 examples varies along one line). ``isotropic``:
            ``v_c · I`` with ``v_c = tr(S_c) / ((n_c − 1) · D)``, the class's own variance averaged over the D
            dimensions (a class seen once: no spread) — the clients then send per class only its count, ``Σx`` and
            ``Σ‖x‖²`` (8·(D + 2) bytes instead of 8·(1 + D + D·r) with ``Σxxᵀ``'s factor of rank r ≤ n_c: 10 kB
            instead of 174 kB for 16 examples in 1280-d), and the server learns no covariance; measured 2.5–4.8
            points below ``class`` with 16 examples a class, above it for 2 (docs/measurements.md). A scope
            (``task_modality``, ``task``, ``modality``, ``global``): the class's own shrunk toward the within-class
            covariance pooled over every (task, modality) group that shares the class's key of that scope —
            ``(S_c + prior · Σ_pool) / (n_c − 1 + prior)`` with ``S_c`` the class's scatter — so a class with few
            examples borrows the shape of its spread from the classes (of its own group, or of other tasks and
            modalities) that have many. No more is sent: the pool is made of the statistics the server has.
        prior: how many examples' worth of the pooled covariance each class's covariance takes (``covariance`` a
            scope only).
    """

    samples: int = 100
    epochs: int = 5
    covariance: str = "class"
    prior: float = 10.0

    def check(self) -> None:
        """Raise a clear error for impossible settings."""
        if self.samples < 1 or self.epochs < 1:
            raise ValueError(
                f"federation.virtual_features.samples and epochs must be >= 1, got samples={self.samples}, "
                f"epochs={self.epochs}"
            )
        if self.covariance not in COVARIANCES:
            raise ValueError(
                f"federation.virtual_features.covariance must be one of {', '.join(COVARIANCES)}, got "
                f"{self.covariance!r}: `class` keeps each class's own covariance, `isotropic` its variance only, a "
                "scope pools the within-class covariance over the (task, modality) groups that share its key"
            )
        if not (self.prior > 0 and math.isfinite(self.prior)):
            raise ValueError(f"federation.virtual_features.prior must be a finite number > 0, got {self.prior}")


COVARIANCES: tuple[str, ...] = ("class", "isotropic", "task_modality", "task", "modality", "global")
"""What ``federation.virtual_features.covariance`` may be: each class's own (full, or its variance), or a scope to
pool over."""


def refuse_on_flower(virtual_features: VirtualFeatures | None) -> None:
    """The Flower engine does not train on virtual features (yet): its server lets the clients' data go and no
    message carries class statistics. Raises a clear error when a recipe asks for it there."""
    if virtual_features is not None:
        raise ValueError(
            "federation.virtual_features runs on mmfl's in-process engine only (mmfl fit, mmfl evaluate): on Flower "
            "the class statistics would need messages of their own, which are not built; drop "
            "federation.virtual_features for `mmfl flower-app`"
        )


class VirtualClients:
    """The virtual clients of :class:`~mmfl.federated.simulation.Simulation` (a mixin: it uses the simulation's clients,
    tasks, training settings and global state)."""

    def init_virtual_clients(self) -> None:
        """Check the recipe and build one virtual client's module per (task, modality) with labelled clients and
        tensors that are merged (built now, so the runs' random draws do not depend on when they are first needed)."""
        self._virtual: dict[str, tuple[PreparedTask, ClientModule, dict[str, Tensor]]] = {}
        self._gaussians: dict[str, dict[int, tuple[Tensor, Tensor]]] | None = None
        vf = self.federation.virtual_features
        if vf is None:
            return
        vf.check()
        for task in self.tasks:
            if not any(c.labeled for c in task.clients):
                continue
            module = self.build_module(task)
            changing = [n for n, p in module.parts.items() if p.changes_encoding(module.modality.name)]
            if changing:
                raise ValueError(
                    "federation.virtual_features draws virtual features of the frozen encoder, but on task "
                    f"{task.name!r} ({task.modality}) part(s) {changing} act before or inside the encoder: use parts "
                    "that leave the input encoder untouched (text prompts, adapters after it), or drop "
                    "federation.virtual_features"
                )
            if not module.trainable_state_dict(include_local=False):  # all its tensors are local: nothing to train
                continue
            module.mixup = 0.0
            local = module.trainable_state_dict(local_only=True)  # its local tensors stay as built
            self._virtual[f"{task.name}/{task.modality}"] = (task, module, local)

    def class_gaussians(self, rnd: int) -> dict[str, dict[int, tuple[Tensor, Tensor]]]:
        """Each (task, modality)'s class Gaussians from the sums of its labelled clients' training features (every
        labelled client's, gathered once, at round ``rnd``: its data and the frozen encoder do not change), their
        covariances pooled as ``covariance`` says. What the clients send is counted in a ``traffic`` row (split
        ``statistics``) of that round: per class held, the count, ``Σx`` and ``Σxxᵀ`` as a factor of its rank or
        its upper triangle, whichever is smaller (``isotropic``: ``Σ‖x‖²`` instead), in float64
        (:class:`~mmfl.federated.class_statistics.ClassSummary`)."""
        if self._gaussians is None:
            vf = self.federation.virtual_features
            self._gaussians, held = {}, {}
            for key, (task, _, _) in self._virtual.items():
                stats = self._class_statistics(key, rnd)
                if stats is None:
                    self._gaussians[key] = {}
                elif vf.covariance == "class":  # each class its own: one group's C·D² sums held at a time
                    self._gaussians[key] = stats.gaussians()
                elif vf.covariance == "isotropic":
                    self._gaussians[key] = stats.isotropic()
                else:  # a pool needs every group's sums at once: filled below, in the groups' order
                    self._gaussians[key], held[key] = {}, ((task.name, task.modality), stats)
            pools = pooled_covariances(dict(held.values()), vf.covariance) if held else {}
            for key, (group, stats) in held.items():
                self._gaussians[key] = stats.gaussians(pools.get(group), vf.prior)
        return self._gaussians

    def _class_statistics(self, key: str, rnd: int) -> ClassStatistics | None:
        """The class statistics of (task, modality) ``key``'s labelled clients, summed (None: none has data); their
        ``traffic`` row (once in a run, also when resumed) and a log line."""
        cache = self.features or FeatureCache(self.backbone, None, self.training.eval_batch_size)
        task, module, _ = self._virtual[key]
        full = self.federation.virtual_features.covariance != "isotropic"
        stats: ClassStatistics | None = None
        senders, nbytes = 0, 0
        for c in self.clients:
            if c.task is not task or not c.data.labeled or not len(c.data.train):
                continue
            x = cache.encodings(module.modality, c.data.train, train=False)  # [N, D]: no random transform
            labels = cache.labels(c.data.train)  # [N]
            if stats is None:
                stats = ClassStatistics(len(task.class_names), x.shape[1], full=full)
            for k, summary in summarize(x, labels, full).items():  # what this client sends
                stats.add_summary(k, summary)
                nbytes += summary.nbytes()
            senders += 1
        sent = any(
            r["split"] == "statistics" and (r["task"], r["modality"]) == (task.name, task.modality)
            for r in self.metrics.rows
        )
        if senders and not sent:  # (a resumed run gathers them again from the data, but they were sent once)
            self.metrics.add(
                rnd, "traffic", task.name, task.modality, "", "statistics", math.nan, math.nan, senders, value=nbytes
            )
        log.info(
            "virtual features: %s: class statistics (count, mean, %s) of %d labelled clients, %d classes "
            "(%.1f MB sent, once)",
            key,
            "covariance" if full else "variance",
            senders,
            0 if stats is None else int((stats.count > 0).sum()),
            nbytes / 1e6,
        )
        return stats

    def virtual_round(self, rnd: int) -> dict[str, Tensor]:
        """Train the merged tensors on virtual features, one virtual client per (task, modality), and put the
        results (merged over the virtual clients that hold each key, weighted by their virtual examples) into the
        global state. Returns them."""
        sums: dict[str, Tensor] = {}
        weights: dict[str, int] = {}
        for key in self.class_gaussians(rnd):
            state, n = self.virtual_client(key, rnd)
            for k, v in state.items():
                sums[k] = sums.get(k, 0) + v.to(torch.float64) * n
                weights[k] = weights.get(k, 0) + n
        out = {k: (sums[k] / weights[k]).to(self.global_state[k].dtype) for k in sums}
        self.global_state.update(out)
        return out

    def virtual_client(self, key: str, rnd: int) -> tuple[dict[str, Tensor], int]:
        """The virtual client of (task, modality) ``key`` at round ``rnd``: from the global tensors, trained on its
        virtual features (drawn with a seed of the run's seed, the round and ``key``). Returns its non-local
        tensors and its number of virtual features (0, and no tensors, when none of its clients holds labels)."""
        from mmfl.federated.settings import derived_seed, seed_all

        vf = self.federation.virtual_features
        gaussians = self.class_gaussians(rnd)[key]
        if not gaussians:
            return {}, 0
        task, module, local = self._virtual[key]
        s = derived_seed(self.seed, rnd, "calibration", key)  # the seed's name since it was first measured (CCVR's)
        x, y = draw(gaussians, vf.samples, torch.Generator().manual_seed(s))  # [C·S, D], [C·S]
        module.load_trainable_state_dict({**self.global_state, **local})
        seed_all(s)
        trainer = self._trainer(vf.epochs)
        module.epoch_metrics = {}
        try:
            trainer.fit(module, train_dataloaders=encoded_loader(x, y, self.training.batch_size, True, seed=s))
        finally:
            module.trainer = None
        m = {k: float(v) for k, v in module.epoch_metrics.items()}
        self.metrics.add(
            rnd, "server", task.name, task.modality, "", "virtual_features", m.get("train_loss", math.nan),
            m.get("train_acc", math.nan), len(y), note=f"{len(gaussians)} classes x {vf.samples} virtual features",
        )  # fmt: skip
        return {k: v.detach().clone() for k, v in module.trainable_state_dict(include_local=False).items()}, len(y)
