"""TrainablePart: the base of every trainable piece a client owns, with per-parameter scopes."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mmfl.backbone import Backbone
from mmfl.federated.scopes import Mix, check_scope, parse_scope, qualify

_COMPONENT = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(?:original|0\.extra\.(\d+))$")
"""A parameter's name once split into components: ``[owner.]parametrizations.NAME.original`` (the first component)
or ``[owner.]parametrizations.NAME.0.extra.I`` (component I + 1)."""


class Components(nn.Module):
    """A parametrization (``torch.nn.utils.parametrize``): the original tensor plus zero-initialised components.

    Args:
        n: how many components beside the original.
        like: a tensor of the parameter's shape, dtype and device.
    """

    def __init__(self, n: int, like: Tensor) -> None:
        super().__init__()
        self.extra = nn.ParameterList([nn.Parameter(torch.zeros_like(like)) for _ in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        """The sum of the original ``x`` and every component (all the parameter's shape)."""
        for e in self.extra:
            x = x + e
        return x


class TrainablePart(nn.Module):
    """A small trainable module attached to a frozen :class:`~mmfl.backbone.Backbone`.

    Every parameter carries a scope (see DESIGN.md and :mod:`mmfl.federated.scopes`): a plain one (``global``,
    ``task``, ``modality``, ``task_modality`` or ``local``), components (``task+task_modality``: the parameter is
    the sum of a ``task`` tensor and a ``task_modality`` one that starts at zero) or a mix
    (``mix(task_modality, task, own=0.8)``). ``scope`` applies to all parameters; ``scopes`` overrides it per parameter
    name (e.g. ``{"ctx": "local"}``). A client module splits parameters of several components with
    :meth:`split_components` (a ``torch.nn.utils.parametrize`` sum, so the part's code reads the sum as before).

    Subclasses take ``(backbone, class_names, ...)`` as their first two arguments, so a recipe can
    name them by ``class_path`` and mmfl builds one per client.

    Hooks (override what the part provides; the defaults leave everything unchanged), in the order
    :class:`~mmfl.module.ClientModule` applies them:
        ``supports(modality)``: whether the part works with a modality (checked when a client is built).
        ``backbone_parameters()``: replacements of frozen backbone weights, active around all encoding.
        ``regularization()``: a term added to the training loss.
        ``prompt_input(x, modality)``: change the raw input batch (e.g. pixel prompts) [B, ...].
        ``vision_prompt_tokens()``: VPT tokens for a ViT tower, [P, W] or [layers, P, W].
        ``text_prompt_tokens()``: input-side prompt vectors [P, W] for text inputs (text modality).
        ``adapt_input_features(f)``: change the encoded inputs [B, D] (adapters, projections).
        ``class_text_features(input_features)``: class text features that replace the hand-written
            prompts: [C, D], or [B, C, D] when conditioned on the batch's encoded inputs [B, D] (CoCoOp).
        ``adapt_text_features(f)``: change the class text features ([C, D] or [B, C, D]).
        ``fuse_logits(logits, f_x)``: change the class logits [B, C] when scoring (a decoupled head adds its own).
        ``training_loss(loss, f_x, f_t, y, mix)``: change the batch's classification loss when training.

    Args:
        backbone: the shared frozen backbone (held by reference, never as a submodule).
        class_names: the client's task label names, in label order.
        name: the part's name in payload keys (``<scope key>/<name>.<param>``).
        scope: the default scope of its parameters.
        scopes: per-parameter scope overrides.
        modalities: serve only clients of these modalities (e.g. ``[audio]`` for an input projection
            in a multi-modal federation); a simulation gives each client the parts that serve its modality.
    """

    modalities: tuple[str, ...] | None = None
    """The modalities this part works with (None: all); read by :meth:`supports`."""

    lr_scale: float = 1.0
    """The learning rate of this part's tensors is the optimizer's times this (a new head learns faster: DePT)."""

    trained_classes_only: bool = False
    """A part that serves only the class list it was trained on (a classifier head): a module built for other class
    names (novel classes, a transfer target) leaves it out, and base-to-novel evaluation does not refuse it."""

    def __init__(
        self,
        backbone: Backbone,
        class_names: list[str],
        name: str,
        scope: str = "task",
        scopes: Mapping[str, str] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.restrict_to(modalities)
        if not name or "/" in name or "." in name:
            raise ValueError(f"part name {name!r} must be non-empty and contain no '/' or '.'")
        self.backbone = backbone  # not an nn.Module: stays out of state_dict and .train()
        self.class_names = list(class_names)
        self.part_name = name
        self.scope = check_scope(scope)
        self.scopes = {k: check_scope(v) for k, v in (scopes or {}).items()}

    def restrict_to(self, modalities: Sequence[str] | None) -> None:
        """Serve only clients of these modalities (None: every modality the part supports).

        Raises:
            ValueError: a named modality is one the part cannot serve.
        """
        if modalities is None:
            return
        allowed = type(self).modalities
        bad = [m for m in modalities if not _allows(allowed, m)]
        if bad or not modalities:
            also = " and modalities that render images" if allowed is not None and "image" in allowed else ""
            raise ValueError(
                f"{type(self).__name__}: modalities={list(modalities)}; it works with {list(allowed or ['any'])}{also}"
            )
        self.modalities = tuple(modalities)

    def scope_of(self, param_name: str) -> str:
        """Scope of one of this part's parameters (``param_name`` as in ``named_parameters()``)."""
        return self.scopes.get(param_name, self.scope)

    def split_components(self) -> None:
        """Make every parameter whose scope has several components the sum of one tensor per component: the
        parameter's own tensor is the first component, the others start at zero. Idempotent."""
        for name, param in list(self.named_parameters()):
            if _COMPONENT.match(name):
                continue  # already split
            spec = parse_scope(self.scope_of(name))
            if len(spec.components) > 1:
                owner_name, _, attr = name.rpartition(".")
                owner = self.get_submodule(owner_name) if owner_name else self
                parametrize.register_parametrization(owner, attr, Components(len(spec.components) - 1, param.detach()))

    def scoped_parameters(self) -> Iterator[tuple[str, str, nn.Parameter, Mix | None]]:
        """Every trainable tensor with its plain scope: ``(scope, name, tensor, mix)``.

        ``name`` is the parameter's name as the part defines it (``ctx``); a parameter split into components
        (:meth:`split_components`) yields one tensor per component, each with its component's scope. ``mix`` is
        the parameter's mix rule (its ``scope`` is then the mix's fine scope), else None.
        """
        for full, param in self.named_parameters():
            m = _COMPONENT.match(full)
            name = _logical_name(full)
            spec = parse_scope(self.scope_of(name))
            index = 0 if m is None or m.group(3) is None else int(m.group(3)) + 1
            if m is None and len(spec.components) > 1:
                raise RuntimeError(f"part {self.part_name!r}: {name!r} has components; call split_components() first")
            yield spec.components[index], name, param, spec.mix

    def qualified_parameters(self, task: str, modality: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable tensor by its payload key for a client of ``task`` and ``modality``
        (``task/digits/coop.ctx``; the part's name is the key's first component after the scope's prefix)."""
        for scope, name, param, _ in self.scoped_parameters():
            yield qualify(scope, task, modality, f"{self.part_name}.{name}"), param

    def check_scopes(self) -> None:
        """Raise if ``scopes`` names a parameter this part does not have."""
        names = {_logical_name(n) for n, _ in self.named_parameters()}
        unknown = sorted(set(self.scopes) - names)
        if unknown:
            raise ValueError(
                f"part {self.part_name!r}: scopes name unknown parameters {unknown}; it has {sorted(names)}"
            )

    def supports(self, modality: str) -> bool:
        """Whether this part can serve clients of ``modality``: those in ``modalities`` (all when None); when
        that includes ``image``, also any modality that renders images (``Modality.renders_image``). A
        restriction set on the part itself (:meth:`restrict_to`, a recipe's ``modalities``) is taken literally."""
        if "modalities" in self.__dict__:  # set on this part: exactly these (None: any)
            return self.modalities is None or modality in self.modalities
        return _allows(type(self).modalities, modality)

    def changes_encoding(self, modality: str | None = None) -> bool:
        """Whether this part acts before or inside the frozen encoder of ``modality``'s inputs (an input prompt,
        vision or text prompt tokens, replaced backbone weights; None: of any modality). When no part of a client
        does, its inputs' encodings are frozen and may be cached."""
        hooks = ("prompt_input", "vision_prompt_tokens", "text_prompt_tokens", "backbone_parameters")
        return any(getattr(type(self), h) is not getattr(TrainablePart, h) for h in hooks)

    def regularization(self) -> Tensor | None:
        """A term [] the part adds to its client's training loss (None: none, the default)."""
        return None

    def backbone_parameters(self) -> dict[str, Tensor]:
        """Tensors that replace frozen backbone parameters of the same open_clip state-dict name while this part's
        client encodes anything (e.g. a trainable copy of the text projection); empty by default."""
        return {}

    def prompt_input(self, x: Tensor, modality: str) -> Tensor:
        """The input batch [B, ...] after this part's input prompt (unchanged by default)."""
        return x

    def vision_prompt_tokens(self) -> Tensor | None:
        """Prompt tokens for a ViT vision tower ([P, W] shallow, [layers, P, W] deep), or None."""
        return None

    def text_prompt_tokens(self) -> Tensor | None:
        """Prompt vectors [P, W] placed after the start token of every input text, or None."""
        return None

    def adapt_input_features(self, f: Tensor) -> Tensor:
        """Encoded inputs [B, D] after this part (unchanged by default)."""
        return f

    def class_text_features(self, input_features: Tensor | None = None) -> Tensor | None:
        """Class text features [C, D] (or [B, C, D] when conditioned on ``input_features`` [B, D]) built
        with learned prompts, or None if this part has none."""
        return None

    def adapt_text_features(self, f: Tensor) -> Tensor:
        """Class text features [C, D] or [B, C, D] after this part (unchanged by default)."""
        return f

    def fuse_logits(self, logits: Tensor, f_x: Tensor) -> Tensor:
        """The class logits [B, C] a client scores with, from the image-text matching ``logits`` [B, C] of the
        normalised input features ``f_x`` [B, D] (unchanged by default)."""
        return logits

    def training_loss(
        self, loss: Tensor, f_x: Tensor, f_t: Tensor, y: Tensor, mix: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """A training batch's classification loss [] after this part (unchanged by default): ``loss`` is the image-text
        matching cross-entropy of input features ``f_x`` [B, D], class features ``f_t`` [C, D] (or [B, C, D]) and
        labels ``y`` [B]; ``mix`` the batch's mixup weights and partners, if mixed."""
        return loss


def optimizer_for(
    parts: Iterable[TrainablePart], factory: Callable[[Iterable[Any]], torch.optim.Optimizer]
) -> torch.optim.Optimizer | None:
    """``factory``'s optimizer over the parts' trainable tensors (None: there are none). Parts whose ``lr_scale`` is
    not 1 get a parameter group of their own, at the factory's learning rate times their scale."""
    groups: dict[float, list[nn.Parameter]] = {}
    for part in parts:
        params = [p for p in part.parameters() if p.requires_grad]
        if params:
            groups.setdefault(part.lr_scale, []).extend(params)
    if not groups:
        return None
    if set(groups) == {1.0}:
        return factory(groups[1.0])
    opt = factory([{"params": ps} for ps in groups.values()])
    for group, scale in zip(opt.param_groups, groups, strict=True):
        group["lr"] *= scale
    return opt


def _logical_name(full: str) -> str:
    """A parameter's name as its part defines it, also once split into components (``parametrizations.ctx.original``
    → ``ctx``)."""
    m = _COMPONENT.match(full)
    if m is None:
        return full
    return f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)


def _allows(allowed: tuple[str, ...] | None, modality: str) -> bool:
    """Whether a part limited to ``allowed`` (None: any) serves ``modality``; image parts serve image-like ones."""
    if allowed is None or modality in allowed:
        return True
    if "image" not in allowed:
        return False
    from mmfl.modalities import ModalityError, get_modality_class  # lazy: mmfl.modalities imports this module

    try:
        return get_modality_class(modality).renders_image
    except ModalityError:
        return False
