"""BackboneProjections: federated adaptation of the backbone's own alignment (its projections into the joint space)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmfl.backbone import Backbone
from mmfl.backbones.projections import PROJECTION_NAMES, TOWERS
from mmfl.prompts.base import TrainablePart


class BackboneProjections(TrainablePart):
    """Trainable copies of the frozen backbone's projections into the joint space: mmfl-mini's text projection, a
    CLIP's ``text_projection`` and ``visual.proj``. Unlike the other parts, what it learns is part of the backbone:
    ``mmfl export`` writes the merged projections into an open_clip checkpoint that any user can load as a better
    aligned backbone (``Backbone(model_name, pretrained=FILE)``), with no prompts.

    Each projection ``W0`` (frozen, shared) becomes ``W = W0 + s · Δ``, with ``Δ`` trained from zero (so a client
    starts from the frozen model) and ``s`` the mean absolute entry of ``W0`` (so the optimizer's step is relative
    to the projection's scale, and one learning rate serves this part and prompts). While a client of this part
    encodes anything (class prompts, inputs), the backbone runs with ``W`` in place of ``W0``
    (:meth:`backbone_parameters`); the shared backbone itself never changes. Its default scope is ``global``: every
    client of every task and modality aligns the one backbone. Clients whose inputs go through a tower whose
    projection is not replaced (images on mmfl-mini) keep their cached encodings.

    Args:
        backbone: the shared frozen backbone.
        class_names: the task's label names (unused: the part is class-agnostic).
        towers: which towers' projections to train (``text``, ``visual``); those the backbone has.
        name: part name in payload keys.
        scope: scope of its parameters.
        scopes: per-parameter scope overrides (parameter names: ``delta.<state name with _ for .>``).
        modalities: serve only clients of these modalities (None: all).
    """

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        towers: Sequence[str] = TOWERS,
        name: str = "align",
        scope: str = "global",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        found = backbone.projections(towers)
        if not found:
            raise ValueError(
                f"BackboneProjections: {backbone.model_name!r} has no projection layer in towers {list(towers)} "
                f"(looked for {[n for t in towers for n in PROJECTION_NAMES[t]]})"
            )
        self.targets: dict[str, str] = {}
        """Parameter key in ``delta`` → the open_clip state-dict name of the projection it adapts."""
        self.scales: dict[str, float] = {}
        self.delta = nn.ParameterDict()
        for state_name, w0 in found.items():
            key = state_name.replace(".", "_")
            self.targets[key] = state_name
            self.scales[key] = float(w0.detach().abs().mean()) or 1.0
            self.delta[key] = nn.Parameter(torch.zeros_like(w0, dtype=torch.float32))
        self.check_scopes()

    def towers(self) -> set[str]:
        """The towers whose projections this part replaces."""
        names = set(self.targets.values())
        return {t for t, candidates in PROJECTION_NAMES.items() if names & set(candidates)}

    def weights(self, delta: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The adapted projections ``W0 + s · Δ`` by state-dict name (from this part's ``Δ``, or from ``delta``: the
        same keys, e.g. a run's merged tensors)."""
        delta = self.delta if delta is None else delta
        out = {}
        for key, state_name in self.targets.items():
            w0 = self.backbone.model.get_parameter(state_name)
            d = delta[key].to(device=w0.device)
            out[state_name] = w0.detach() + (self.scales[key] * d).to(w0.dtype)
        return out

    def backbone_parameters(self) -> dict[str, Tensor]:
        """The adapted projections, in place of the frozen ones while this part's client encodes."""
        return self.weights()

    def changes_encoding(self, modality: str | None = None) -> bool:
        """Whether ``modality``'s inputs pass through a replaced projection: the text tower's for text, the vision
        tower's for images and modalities that render images; True for any other (or unknown) modality."""
        if modality is None:
            return True
        from mmfl.modalities import ModalityError, get_modality_class  # lazy: mmfl.modalities imports the parts

        try:
            renders_image = modality == "image" or get_modality_class(modality).renders_image
        except ModalityError:
            return True
        if renders_image:
            return "visual" in self.towers()
        return modality != "text" or "text" in self.towers()
