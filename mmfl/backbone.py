"""The frozen CLIP-style backbone: the only module that touches open_clip and tower internals."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from mmfl.backbones import OFFLINE_BACKBONES, check_offline, resolve_offline

log = logging.getLogger(__name__)

_CONFIGS_REGISTERED = False


def register_model_configs() -> None:
    """Register mmfl's bundled open_clip model configs (idempotent)."""
    global _CONFIGS_REGISTERED
    if _CONFIGS_REGISTERED:
        return
    open_clip.add_model_config(Path(__file__).parent / "model_configs")
    _CONFIGS_REGISTERED = True


def check_backbone_args(model_name: str, pretrained: str | None) -> None:
    """Raise a clear error for an unknown model name or a pretrained tag/path that cannot be found.

    Cheap (builds nothing), so recipes are checked before any long work.
    """
    register_model_configs()
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    check_offline(model_name)  # mmfl-mini: its packages are installed, its config registered
    if model_name in OFFLINE_BACKBONES:
        return
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=6, cutoff=0.5)
        hint = f"Close names: {', '.join(close)}. " if close else ""
        raise ValueError(
            f"backbone.model_name={model_name!r} is not an open_clip model. {hint}Use a name from "
            "open_clip.list_models(), an 'hf-hub:org/repo' id, or register a config with "
            "open_clip.add_model_config()."
        )
    if pretrained is None or pretrained == "":
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        return
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(
                f"backbone.pretrained={pretrained!r}: no such checkpoint file. Give an existing path, "
                f"a pretrained tag of {model_name!r} ({tags or 'none known'}), or null for random weights."
            )
        return
    raise ValueError(
        f"backbone.pretrained={pretrained!r} is neither a pretrained tag of {model_name!r} "
        f"({tags or 'none known'}) nor a checkpoint file path. Use null for random weights."
    )


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
            ``None`` for random weights. ``mmfl-mini`` always loads its offline build.
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
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            **extra,
        )
        self.model: nn.Module = model
        self.preprocess_train: Callable[[Any], Tensor] = preprocess_train
        self.preprocess_val: Callable[[Any], Tensor] = preprocess_val
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        self.model.requires_grad_(False)
        self.model.eval()
        self._hf = isinstance(getattr(model, "text", None), open_clip.hf_model.HFTextEncoder)
        # Native open_clip text transformer: attributes live on CLIP itself or on CustomTextCLIP.text.
        self._text = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if self._text is None:
            raise TypeError(f"{model_name!r} has no text tower mmfl knows how to drive.")
        with torch.no_grad():  # open_clip models do not expose it: read it off one encoding, once
            self.embed_dim: int = int(self.encode_text(self.tokenize(["a"])).shape[-1])
        log.info(
            "backbone %s (weights: %s): %.1f M frozen params, embed_dim=%d, text_width=%d",
            model_name,
            "offline build" if offline is not None else (weights or "random"),
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
    def logit_scale(self) -> Tensor:
        """The model's learned log temperature; logits use ``logit_scale.exp()``. Shape []."""
        return self.model.logit_scale.detach().reshape(())

    @property
    def pad_token_id(self) -> int:
        """Id of the padding token."""
        if self._hf:
            return int(self.model.text.config.pad_token_id)
        return int(getattr(self._text, "pad_id", 0))

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
        """Tokenize texts into ids padded to the context length. Returns [N, L] long."""
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids [N, L] → input token embeddings [N, L, W] (no positions added)."""
        return self._token_embedding()(tokens.to(self.device))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Encode token ids [N, L] → unnormalised joint-space features [N, D] (open_clip's path)."""
        return self.model.encode_text(tokens.to(self.device))

    def encode_text_embeds(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        """Encode token embeddings through the text tower.

        ``encode_text_embeds(embed_tokens(t), t)`` equals ``encode_text(t)``; prompt methods replace
        some of the embeddings with learned vectors. ``tokens`` decide padding and pooling (the EOT
        position), so learned vectors must sit where the placeholder tokens were.

        Args:
            embeds: token embeddings [N, L, W].
            tokens: the token ids they stand for [N, L].

        Returns:
            Unnormalised joint-space features [N, D].
        """
        tokens = tokens.to(embeds.device)
        if self._hf:
            return self._encode_hf_embeds(embeds, tokens)
        return self._encode_native_embeds(embeds, tokens)

    def _encode_hf_embeds(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        text = self.model.text
        attn_mask = (tokens != text.config.pad_token_id).long()  # [N, L]
        out = text.transformer(inputs_embeds=embeds, attention_mask=attn_mask)
        pooled = text.pooler(out, attn_mask)  # [N, W]
        return text.proj(pooled)  # [N, D]

    def _encode_native_embeds(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        t = self._text
        cast_dtype = t.transformer.get_cast_dtype()
        x = embeds.to(cast_dtype)  # [N, L, W]
        seq_len = x.shape[1]
        cls_emb = getattr(t, "cls_emb", None)
        if cls_emb is not None:  # CoCa-style appended class token
            x = torch.cat([x, cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
            seq_len += 1
        attn_mask = t.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:seq_len, :seq_len]
        if getattr(t, "use_pad_mask", False) or cls_emb is not None:
            add_mask = t._build_additive_mask(tokens, seq_len, x.dtype)  # [N*H, L, L]
            attn_mask = add_mask if attn_mask is None else attn_mask.unsqueeze(0) + add_mask
        x = x + t.positional_embedding[:seq_len].to(cast_dtype)
        x = t.transformer(x, attn_mask=attn_mask)
        if cls_emb is not None:
            pooled = t.ln_final(x[:, -1])  # [N, W]
        else:
            x = t.ln_final(x)
            pool_type = getattr(t, "text_pool_type", None) or getattr(t, "pool_type", "argmax")
            eos_id = getattr(t, "text_eos_id", None) or getattr(t, "eos_id", None)
            pooled = open_clip.transformer.text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
        proj = t.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # [N, D]

    # ------------------------------------------------------------------ image
    def encode_image(self, images: Tensor, prompt_tokens: Tensor | None = None) -> Tensor:
        """Encode preprocessed images [B, 3, H, W] → unnormalised joint-space features [B, D].

        Args:
            images: [B, 3, H, W].
            prompt_tokens: VPT prompt tokens for a ViT tower: [P, W] (shallow: inserted after the
                class token at the input) or [layers, P, W] (deep: the P prompt positions are replaced
                before every block). Dropped again before pooling. None: the model's own forward.
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
        deep = prompts.dim() == 3
        if prompts.shape[-1] != width or (deep and prompts.shape[0] != n_layers):
            raise ValueError(f"prompt tokens {tuple(prompts.shape)} do not fit {n_layers} blocks of width {width}")
        x = v._embeds(images)  # [B, 1+N, W] after ln_pre
        n_prompt = prompts.shape[-2]
        first = (prompts[0] if deep else prompts).to(x.dtype)
        x = torch.cat([x[:, :1], first.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # [B, 1+P+N, W]
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            if deep and i > 0:
                p = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, P, W]
                x = torch.cat([x[:, :1], p, x[:, 1 + n_prompt :]], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x = torch.cat([x[:, :1], x[:, 1 + n_prompt :]], dim=1)  # [B, 1+N, W]: prompts dropped
        pooled, _ = v._pool(x)  # [B, W]
        return pooled @ v.proj if v.proj is not None else pooled  # [B, D]

    def __repr__(self) -> str:
        return f"Backbone({self.model_name!r}, pretrained={self.pretrained!r})"
