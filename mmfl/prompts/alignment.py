"""BackboneProjections: federated adaptation of the backbone's own alignment (its projections into the joint space)."""

from __future__ import annotations

import weakref
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
        keep: weight of a term added to each client's training loss that keeps what the projections already know:
            the mean relative squared change ``‖(W − W0) a‖² / ‖W0 a‖²`` of the projected features ``a`` of
            anchor texts (``"a photo of a {name}."`` for ImageNet's 1,000 class names, through the frozen text
            tower) for a text projection, and ``‖W − W0‖² / ‖W0‖²`` for a vision one. 0: off.
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
        keep: float = 0.0,
    ) -> None:
        super().__init__(backbone, class_names, name=name, scope=scope, scopes=scopes, modalities=modalities)
        if not keep >= 0:
            raise ValueError(f"BackboneProjections: keep must be >= 0, got {keep}")
        self.keep = keep
        found = backbone.projections(towers)
        if not found:
            raise ValueError(
                f"BackboneProjections: {backbone.model_name!r} has no projection layer in towers {list(towers)} "
                f"(looked for {[n for t in towers for n in PROJECTION_NAMES[t]]})"
            )
        self.targets: dict[str, str] = {}
        """Parameter key in ``delta`` → the open_clip state-dict name of the projection it adapts."""
        self.scales: dict[str, float] = {}
        self._frozen: dict[str, Tensor] = {}  # key → the backbone's own parameter (a plain dict: not this part's)
        self._anchor_norms: dict[str, Tensor] = {}
        self.delta = nn.ParameterDict()
        for state_name, w0 in found.items():
            key = state_name.replace(".", "_")
            self.targets[key] = state_name
            self._frozen[key] = w0
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
            w0 = self._frozen[key]  # held, not looked up: inside Backbone.call_with the model's slot holds W
            d = delta[key].to(device=w0.device)
            out[state_name] = w0.detach() + (self.scales[key] * d).to(w0.dtype)
        return out

    def regularization(self) -> Tensor | None:
        """``keep`` × the mean relative change of what the projections map (see the class's ``keep``). [] or None."""
        if self.keep <= 0:
            return None
        terms = []
        for key, state_name in self.targets.items():
            w0, d = self._frozen[key].detach(), self.scales[key] * self.delta[key]  # W − W0 = s·Δ
            if state_name in PROJECTION_NAMES["text"] and not state_name.endswith("bias"):
                a = anchor_pooled(self.backbone).to(d.device)  # [A, W]
                linear = state_name.endswith("weight")  # nn.Linear [D, W]: a @ Wᵀ; a native matrix [W, D]: a @ W
                if key not in self._anchor_norms:  # ‖W0 a‖² per anchor [A]: fixed
                    self._anchor_norms[key] = (a @ (w0.t() if linear else w0)).pow(2).sum(-1).clamp_min(1e-12)
                change = a @ d.t() if linear else a @ d  # [A, D]
                terms.append((change.pow(2).sum(-1) / self._anchor_norms[key].to(d.device)).mean())
            else:
                terms.append(d.pow(2).sum() / w0.pow(2).sum().clamp_min(1e-12))
        return self.keep * torch.stack(terms).mean()

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


_ANCHORS: weakref.WeakKeyDictionary[Backbone, Tensor] = weakref.WeakKeyDictionary()


def anchor_texts() -> list[str]:
    """``"a photo of a {name}."`` for the first name of each of ImageNet's 1,000 classes (timm's class list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [f"a photo of a {info.index_to_description(i).split(',')[0].strip()}." for i in range(info.num_classes())]


@torch.no_grad()
def anchor_pooled(backbone: Backbone) -> Tensor:
    """The anchor texts through the frozen text tower, before its projection (once per backbone). [A, W]"""
    if backbone not in _ANCHORS:
        with torch.inference_mode(False):
            out = []
            texts = anchor_texts()
            for i in range(0, len(texts), 250):
                tokens = backbone.tokenize(texts[i : i + 250])
                out.append(backbone.encode_text_embeds(backbone.embed_tokens(tokens), tokens, project=False).float())
            _ANCHORS[backbone] = torch.cat(out)
    return _ANCHORS[backbone]
