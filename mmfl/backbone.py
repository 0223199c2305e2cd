"""The frozen CLIP-style backbone: the only module that touches open_clip and tower internals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import open_clip
import torch
from torch import Tensor, nn

from mmfl.backbones import resolve_offline
from mmfl.backbones.args import check_backbone_args
from mmfl.backbones.blocks import encode_vit_prompted, prefix_layout
from mmfl.backbones.projections import TOWERS, call_with_parameters, find_projections
from mmfl.backbones.text_tower import encode_hf, encode_native, hf_layers
from mmfl.hub import fetching

log = logging.getLogger(__name__)
_TOKEN_CACHE_TEXTS = 64  # Backbone.tokenize keeps calls of at most this many texts ...
_TOKEN_CACHE_ENTRIES = 256  # ... and at most this many calls (≤ 64 × 77 ids each)
T = TypeVar("T")


class Backbone:
    """A frozen open_clip model with the hooks prompt methods need.

    The backbone is deliberately *not* an ``nn.Module``: modules that hold it (one per client) do not
    own its weights, so its parameters never appear in their state dicts or checkpoints, Lightning's
    ``train()`` never flips it out of eval mode, and one instance serves every client in the process.

    Args:
        model_name: an open_clip model name (``open_clip.list_models()``), an ``hf-hub:`` id, or a
            config registered with ``open_clip.add_model_config``. mmfl adds ``mmfl-mini`` (the offline
            default: pretrained towers from installed packages, aligned) and ``mmfl-tiny`` (random).
        pretrained: an open_clip pretrained tag (e.g. ``openai``), a local checkpoint path, or
            ``None`` for random weights. ``mmfl-mini`` loads its offline build unless given a checkpoint file
            (e.g. one written by ``mmfl export``).
        device: where the frozen model lives at first; ``to()`` moves it.
        precision: open_clip precision string (``fp32``, ``bf16``, ``fp16``, ...).
        cache_dir: where open_clip caches downloaded weights.

    Attributes:
        embed_dim: width of the joint image-text space.
        model: the frozen open_clip model.
    """

    def __init__(
        self,
        model_name: str = "mmfl-mini",
        pretrained: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        cache_dir: str | None = None,
    ) -> None:
        check_backbone_args(model_name, pretrained)
        self.model_name = model_name
        self.pretrained = pretrained
        weights, extra = pretrained or None, {}
        offline = resolve_offline(model_name, pretrained)
        if offline is not None:  # mmfl-mini: a checkpoint assembled from installed packages
            weights, extra = offline
        what = f"backbone {model_name!r}" + (f" with weights {pretrained!r}" if pretrained else "")
        mend = (
            "give backbone.pretrained a local checkpoint file of that model (downloaded where there is network), "
            "or use the offline backbone mmfl-mini"
        )
        with fetching(what, mend):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                model_name,
                pretrained=weights,
                device=device,
                precision=precision,
                cache_dir=cache_dir,
                **extra,
            )
            self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        self._tokens: dict[tuple[str, ...], Tensor] = {}  # tokenize()'s cache
        self.model: nn.Module = model
        self.preprocess_train: Callable[[Any], Tensor] = preprocess_train
        self.preprocess_val: Callable[[Any], Tensor] = preprocess_val
        self.model.requires_grad_(False)
        self.model.eval()
        self._hf = isinstance(getattr(model, "text", None), open_clip.hf_model.HFTextEncoder)
        # Native open_clip text transformer: attributes live on CLIP itself or on CustomTextCLIP.text.
        self._text = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if self._text is None:
            raise TypeError(f"{model_name!r} has no text tower mmfl knows how to drive.")
        self.truncate_text = True
        """Cut learned-prompt batches to their longest prompt before the text tower (see encode_text_embeds)."""
        with torch.no_grad():  # open_clip models do not expose it: read it off one encoding, once
            self.embed_dim: int = int(self.encode_text(self.tokenize(["a"])).shape[-1])
        log.info(
            "backbone %s (weights: %s): %.1f M frozen params, embed_dim=%d, text_width=%d",
            model_name,
            "offline build" if offline is not None and weights != pretrained else (weights or "random"),
            sum(p.numel() for p in model.parameters()) / 1e6,
            self.embed_dim,
            self.text_width,
        )

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Device of the frozen weights."""
        return next(self.model.parameters()).device

    @property
    def text_width(self) -> int:
        """Width of the text tower's token embeddings."""
        return int(self._token_embedding().embedding_dim)

    @property
    def context_length(self) -> int:
        """Number of tokens the tokenizer produces per text."""
        return int(self.tokenizer.context_length)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the vision tower's input."""
        size = getattr(self.model.visual, "image_size", None) or self.model.visual.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def image_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std the vision tower's inputs are normalised with."""
        cfg = self.model.visual.preprocess_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    @property
    def logit_scale(self) -> Tensor:
        """The model's learned log temperature; logits use ``logit_scale.exp()``. Shape []."""
        return self.model.logit_scale.detach().reshape(())

    @property
    def pad_token_id(self) -> int:
        """Id of the padding token."""
        if self._hf:
            return int(self.model.text.config.pad_token_id)
        return int(getattr(self._text, "pad_id", 0))

    def projections(self, towers: Sequence[str] = TOWERS) -> dict[str, nn.Parameter]:
        """The frozen layers that map ``towers``' pooled features into the joint space, by open_clip state-dict name
        (``text.proj.weight`` for mmfl-mini; ``text_projection`` and ``visual.proj`` for a ViT CLIP)."""
        return find_projections(self.model, towers)

    def call_with(self, params: Mapping[str, Tensor], fn: Callable[[], T]) -> T:
        """Run ``fn`` (any encoding through this backbone) with the frozen parameters named in ``params`` replaced
        by its tensors (e.g. a client's trainable copy of a projection); the backbone itself is left unchanged."""
        return call_with_parameters(self.model, params, fn)

    def to(self, device: torch.device | str) -> Backbone:
        """Move the frozen weights (no-op when already there)."""
        if self.device != torch.device(device):
            self.model.to(device)
        return self

    # ------------------------------------------------------------------ text
    def _token_embedding(self) -> nn.Embedding:
        if self._hf:
            return self.model.text.transformer.get_input_embeddings()
        return self._text.token_embedding

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Tokenize texts into ids padded to the context length. Returns [N, L] long (a new tensor).

        Short lists (class names, templates: what every client's parts tokenize when they are built) are kept,
        so a federation of thousands of clients tokenizes them once.
        """
        key = tuple(texts)
        tokens = self._tokens.get(key) if len(key) <= _TOKEN_CACHE_TEXTS else None
        if tokens is None:
            tokens = self.tokenizer(list(texts))
            if len(key) <= _TOKEN_CACHE_TEXTS:
                if len(self._tokens) >= _TOKEN_CACHE_ENTRIES:
                    self._tokens.clear()
                self._tokens[key] = tokens
        return tokens.clone().to(self.device)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids [N, L] → input token embeddings [N, L, W] (no positions added)."""
        return self._token_embedding()(tokens.to(self.device))

    def encode_text(self, tokens: Tensor, prefix: Tensor | None = None) -> Tensor:
        """Encode token ids [N, L] → unnormalised joint-space features [N, D].

        Args:
            tokens: token ids [N, L] as :meth:`tokenize` makes them.
            prefix: learned input-side prompt vectors [P, W] placed right after the start token of every
                text (see :meth:`insert_prefix`); None: open_clip's own path.
        """
        if prefix is None:
            return self.model.encode_text(tokens.to(self.device))
        tokens, embeds = self.insert_prefix(tokens, prefix)
        return self.encode_text_embeds(embeds, tokens)

    def text_lengths(self, tokens: Tensor) -> Tensor:
        """Tokens up to and including the end token, per row. [N] long."""
        if self._hf:
            return (tokens != self.pad_token_id).sum(dim=1)
        # CLIP's pad id 0 is also the id of "!", so find the end token rather than count non-padding
        t = self._text
        pool = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
        eos = getattr(t, "text_eos_id", None) or getattr(t, "eos_id", None)
        if pool != "eos" or eos is None:
            return tokens.argmax(dim=1) + 1  # CLIP's end token has the largest id (its argmax pooling)
        is_eos = (tokens == eos).long()
        return torch.where(is_eos.any(dim=1), is_eos.argmax(dim=1) + 1, torch.full_like(tokens[:, 0], tokens.shape[1]))

    def insert_prefix(self, tokens: Tensor, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """Make room for ``P`` prompt vectors after the start token of each text.

        Each row becomes ``[start] prefix(P) content [end] pad...`` in the same length L: content that no
        longer fits is cut from its end, and the end token is kept, so pooling (the end token's position,
        or the non-padding mask) stays right. The prompt positions hold the start token's id.

        Args:
            tokens: token ids [N, L] (start token, content, end token, padding).
            prefix: prompt vectors [P, W].

        Returns:
            The new token ids [N, L] and their embeddings [N, L, W] with the prompt vectors in place.
        """
        tokens = tokens.to(self.device)
        length = tokens.shape[1]
        p = prefix.shape[0]
        if prefix.dim() != 2 or prefix.shape[1] != self.text_width or p > length - 2:
            raise ValueError(
                f"input prompt {tuple(prefix.shape)} must be [P, {self.text_width}] with P <= {length - 2}"
            )
        new, is_prompt = prefix_layout(tokens, self.text_lengths(tokens), p, self.pad_token_id)  # [N, L], [1, L]
        embeds = self.embed_tokens(new)  # [N, L, W]
        prompt = torch.zeros(length, prefix.shape[1], dtype=embeds.dtype, device=embeds.device)
        prompt = torch.cat([prompt[:1], prefix.to(embeds.dtype), prompt[1 + p :]])  # [L, W]
        embeds = torch.where(is_prompt.unsqueeze(-1), prompt.unsqueeze(0), embeds)  # [N, L, W]
        return new, embeds

    @property
    def text_depth(self) -> int:
        """Number of blocks in the text tower."""
        return len(hf_layers(self.model.text, self.model_name)) if self._hf else len(self._text.transformer.resblocks)

    def encode_text_embeds(
        self,
        embeds: Tensor,
        tokens: Tensor,
        deep_prompts: Tensor | None = None,
        prompt_start: int = 1,
        text_len: int | None = None,
        project: bool = True,
    ) -> Tensor:
        """Encode token embeddings through the text tower.

        ``encode_text_embeds(embed_tokens(t), t)`` equals ``encode_text(t)``; prompt methods replace
        some of the embeddings with learned vectors. ``tokens`` decide padding and pooling (the EOT
        position), so learned vectors must sit where the placeholder tokens were.

        Args:
            embeds: token embeddings [N, L, W].
            tokens: the token ids they stand for [N, L].
            deep_prompts: deep text prompts [K, P, W] (MaPLe, deep language prompting): before block
                ``k + 1`` of the tower (k < K ≤ depth − 1), the hidden states at positions
                ``prompt_start .. prompt_start + P − 1`` are replaced by ``deep_prompts[k]`` (no
                positional embedding added). The input layer's prompts are part of ``embeds``.
            prompt_start: first position the deep prompts replace (1: right after the start token).
            text_len: ``int(text_lengths(tokens).max())`` when the caller knows it already (prompt parts compute
                it once from their fixed class prompts). Otherwise it is computed from ``tokens``, which reads a
                device value back to the host (a device sync on a GPU) when ``tokens`` are on the device.
            project: apply the tower's projection into the joint space (False: stop before it).

        Returns:
            Unnormalised joint-space features [N, D]; with ``project`` False, the pooled features before the
            tower's projection [N, W] (:meth:`project_text` maps them).
        """
        if deep_prompts is not None:
            self._check_deep_text_prompts(deep_prompts, prompt_start, tokens.shape[-1])
        keep = self._text_keep(tokens, deep_prompts, prompt_start, text_len)  # before the move: no sync for CPU ids
        tokens = tokens.to(embeds.device)
        if keep < tokens.shape[1]:  # positions after every prompt's end token change nothing that is pooled
            embeds, tokens = embeds[:, :keep], tokens[:, :keep]  # [N, keep, W], [N, keep]
        if self._hf:
            pooled = encode_hf(self.model.text, embeds, tokens, deep_prompts, prompt_start, self.model_name)
        else:
            pooled = encode_native(self._text, embeds, tokens, deep_prompts, prompt_start)
        return self.project_text(pooled) if project else pooled  # [N, D] or [N, W]

    def _text_keep(self, tokens: Tensor, deep: Tensor | None, start: int, text_len: int | None = None) -> int:
        """How many leading positions the text tower needs: up to the longest prompt's end token (and the deep
        prompts' positions), when the rest cannot change the pooled feature; else all of them.

        That holds for HF towers (padding is masked out of attention and pooling) and for native towers with a
        causal mask or a padding mask that pool at the end token or the first token.
        """
        length = tokens.shape[1]
        if not self.truncate_text:
            return length
        if not self._hf:
            t = self._text
            pool = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
            masked = t.attn_mask is not None or getattr(t, "use_pad_mask", False)
            if getattr(t, "cls_emb", None) is not None or pool not in ("argmax", "eos", "first") or not masked:
                return length
        keep = int(self.text_lengths(tokens).max()) if text_len is None else text_len
        if deep is not None:
            keep = max(keep, start + deep.shape[1])
        return min(length, keep)

    def _check_deep_text_prompts(self, prompts: Tensor, start: int, length: int) -> None:
        depth, width = self.text_depth, self.text_width
        if prompts.dim() != 3 or prompts.shape[-1] != width or prompts.shape[0] > depth - 1:
            raise ValueError(
                f"deep text prompts {tuple(prompts.shape)} must be [K, P, {width}] with K <= {depth - 1} "
                f"(the text tower of {self.model_name!r} has {depth} blocks; the first takes the input prompts)"
            )
        if start < 1 or start + prompts.shape[1] > length:
            raise ValueError(
                f"deep text prompts: positions {start}..{start + prompts.shape[1] - 1} outside 1..{length - 1}"
            )

    def project_text(self, pooled: Tensor) -> Tensor:
        """The text tower's projection into the joint space: pooled features [N, W] → [N, D]
        (``encode_text_embeds(..., project=False)`` then this equals ``encode_text_embeds(...)``)."""
        if self._hf:
            return self.model.text.proj(pooled)
        proj = self._text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # [N, D]

    # ------------------------------------------------------------------ image
    def encode_image(self, images: Tensor, prompt_tokens: Tensor | None = None) -> Tensor:
        """Encode preprocessed images [B, 3, H, W] → unnormalised joint-space features [B, D].

        Args:
            images: [B, 3, H, W].
            prompt_tokens: prompt tokens for a ViT tower: [P, W] (shallow: inserted after the class
                token at the input) or [K, P, W] with K <= blocks (deep: ``prompt_tokens[0]`` is inserted
                at the input and the P prompt positions are replaced by ``prompt_tokens[k]`` before block
                k for 0 < k < K; later blocks carry them on). Dropped again before pooling. None: the
                model's own forward.
        """
        images = images.to(self.device)
        if prompt_tokens is None:
            return self.model.encode_image(images)
        return self._encode_image_prompted(images, prompt_tokens)

    @property
    def vision_is_vit(self) -> bool:
        """Whether the vision tower is open_clip's VisionTransformer (which takes prompt tokens)."""
        return isinstance(self.model.visual, open_clip.transformer.VisionTransformer)

    def vision_token_shape(self) -> tuple[int, int]:
        """(number of blocks, token width) of a ViT vision tower.

        Raises:
            ValueError: the tower is not a ViT (e.g. mmfl-mini's CNN), naming the pixel-space alternative.
        """
        if not self.vision_is_vit:
            raise ValueError(
                f"{self.model_name!r} has a {type(self.model.visual).__name__} vision tower, which takes no prompt "
                "tokens; use a pixel-space prompt (mmfl.prompts.PaddingPrompt), which works with any tower"
            )
        v = self.model.visual
        return len(v.transformer.resblocks), int(v.class_embedding.shape[-1])

    def _encode_image_prompted(self, images: Tensor, prompts: Tensor) -> Tensor:
        n_layers, width = self.vision_token_shape()
        v = self.model.visual
        if prompts.dim() == 2:  # shallow: the input layer's tokens only
            prompts = prompts.unsqueeze(0)  # [1, P, W]
        if prompts.dim() != 3 or prompts.shape[-1] != width or not 1 <= prompts.shape[0] <= n_layers:
            raise ValueError(
                f"prompt tokens {tuple(prompts.shape)} must be [P, {width}] or [K, P, {width}] with "
                f"1 <= K <= {n_layers} (the vision tower's blocks)"
            )
        return encode_vit_prompted(v, images, prompts.to(v.class_embedding.dtype))

    def __repr__(self) -> str:
        return f"Backbone({self.model_name!r}, pretrained={self.pretrained!r})"
