"""A simulated client: its data, its task and what is truly its own; the module it trains with is shared.

Clients of one (task, modality) train one at a time, so a :class:`~mmfl.federated.simulation.Simulation` keeps one
:class:`~mmfl.module.ClientModule` per (task, modality), the *pool*, and per client only its ``local`` tensors
(personal parts, never sent) and, when synthetic anchors are on, the classes it holds (read from its data when it
is first needed). :attr:`Client.module` swaps the client's own state into the pool's module. Memory then stays
flat in the number of clients, whatever the parts: a MaPLe module on ViT-B/16 holds 14 MB, which 1,000 clients
would otherwise each hold.

With ``per_client_modules`` (the engine before pooling, kept to compare against and for tests that inspect each
client's trained tensors) every client owns a module. Both give the same tensors bit for bit: the pool's module is
the first client's, and every later client's parts are still built, in the same order, so each one's initial local
tensors and every random draw after them are what they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from mmfl.backbone import Backbone
from mmfl.data.task import ClientData, PreparedTask
from mmfl.federated.scopes import is_local
from mmfl.module import ClientModule
from mmfl.prompts.base import TrainablePart

_UNREAD = object()


@dataclass(eq=False)  # a client is itself: compared by identity (its tensors are not compared)
class Client:
    """One simulated client.

    Attributes:
        data: its data.
        task: its prepared task (one (task, modality)).
        shared: the module it trains with: its (task, modality)'s pool, or its own (``own``).
        own: whether ``shared`` is this client's alone (per-client modules).
        local: its ``local`` tensors while it does not own its module (its own module holds them otherwise).
        anchors: whether it trains with synthetic anchors for the classes it lacks (``knowledge.anchors``).
        touched: its local tensors may differ from their initial values (it trained, or they were set). Those of
            an untouched client are what building the federation gives it, so a checkpoint leaves them out.
    """

    data: ClientData
    task: PreparedTask
    shared: ClientModule
    own: bool = False
    local: dict[str, Tensor] = field(default_factory=dict)
    anchors: bool = False
    touched: bool = False
    _held: object = field(default=_UNREAD, repr=False)

    @property
    def module(self) -> ClientModule:
        """Its module with its own state in: its local tensors and held classes (the non-local tensors are whatever
        was loaded last; training and evaluation load the global state first). A pooled module is lent: what it
        holds is this client's until another client's module is asked for (copy tensors to keep them)."""
        if self.own:
            return self.shared
        if self.local:
            self.shared.load_trainable_state_dict(self.local)
        self.shared.held_classes = self.held_classes()
        return self.shared

    def held_classes(self) -> list[int] | None:
        """The labels of its training data when it trains with anchors (else None); read once."""
        if self._held is _UNREAD:
            self._held = self.data.classes() if self.anchors else None
        return self._held  # type: ignore[return-value]

    def local_state(self) -> dict[str, Tensor]:
        """A copy of its ``local`` tensors."""
        if self.own:
            return self.shared.trainable_state_dict(local_only=True)
        return {k: v.clone() for k, v in self.local.items()}

    def local_snapshot(self) -> dict[str, Tensor]:
        """Its ``local`` tensors as they are now, for keeping: no copy where they are never changed in place (a
        pooled client's are replaced, not written into)."""
        return self.local_state() if self.own else dict(self.local)

    def set_local(self, state: dict[str, Tensor]) -> None:
        """Set its ``local`` tensors from ``state`` (other keys are ignored; a new dict, never written into)."""
        self.touched = self.touched or bool(state)
        if self.own:
            self.shared.load_trainable_state_dict({k: v for k, v in state.items() if is_local(k)})
        else:
            self.local = {k: state[k].detach().to("cpu", copy=True) if k in state else v for k, v in self.local.items()}

    def keep_trained(self) -> None:
        """After it trained with :attr:`module`: keep the local tensors the training left there as its own."""
        self.touched = True
        if not self.own and self.local:
            self.local = self.shared.trainable_state_dict(local_only=True)

    def restore(self, global_state: dict[str, Tensor], local: dict[str, Tensor]) -> None:
        """A resumed run's state: the global tensors (into an own module, as it last held them) and its local ones
        (none: it keeps those it was built with)."""
        self.touched = self.touched or bool(local)
        if self.own:
            self.shared.load_trainable_state_dict({**global_state, **local})
        else:
            self.set_local(local)


def initial_local(
    factories: Sequence[Callable[[Backbone, list[str]], TrainablePart]], backbone: Backbone, task: PreparedTask
) -> dict[str, Tensor]:
    """The initial ``local`` tensors of a new client of ``task``: its parts built as a simulation builds a client's
    module (every factory called, in order: the same random draws), without a module around them."""
    built = [f(backbone, list(task.class_names)) for f in factories]
    local = {}
    for p in built:
        if p.supports(task.modality):
            p.split_components()
            for k, v in p.qualified_parameters(task.name, task.modality):
                if is_local(k):
                    local[k] = v.detach().clone()
    return local
