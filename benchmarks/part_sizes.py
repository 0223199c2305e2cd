"""Trainable parameters and bytes sent per client per round for each part family, against full-model FedAvg.

``python -m benchmarks.part_sizes`` builds mmfl-mini (offline) and ViT-B-16 (random weights: only the
shapes matter) and prints one table; fp32 payloads, one direction.
"""

from __future__ import annotations

from collections.abc import Callable

from mmfl.backbone import Backbone
from mmfl.prompts import (
    ClipAdapter,
    CoOp,
    MaPLe,
    PaddingPrompt,
    ProjectionTuning,
    TrainablePart,
    VisualPromptTokens,
)

CLASSES = [f"class {i}" for i in range(10)]


def families(bb: Backbone) -> dict[str, Callable[[], TrainablePart] | None]:
    """A factory per family with its usual settings (10 classes); None where the tower cannot take it."""
    pad = 30 if bb.image_size[0] >= 224 else 8
    vit = bb.vision_is_vit
    return {
        "CoOp, 16 shared context vectors": lambda: CoOp(bb, CLASSES, n_ctx=16),
        "CoOp, class-specific, 4 x 10 classes": lambda: CoOp(bb, CLASSES, n_ctx=4, class_specific=True),
        "CLIP-Adapter, image side, r=4": lambda: ClipAdapter(bb, CLASSES, side="input"),
        "projection tuning, image side": lambda: ProjectionTuning(bb, CLASSES, side="input"),
        f"pixel padding prompt, {pad} px": lambda: PaddingPrompt(bb, CLASSES, pad=pad),
        "VPT shallow, 8 tokens": (lambda: VisualPromptTokens(bb, CLASSES, n_tokens=8)) if vit else None,
        "VPT deep, 8 tokens per block": (lambda: VisualPromptTokens(bb, CLASSES, n_tokens=8, deep=True))
        if vit
        else None,
        "MaPLe, 2 tokens, depth 9 (coupled)": (lambda: MaPLe(bb, CLASSES, n_ctx=2, ctx_init=None, depth=9))
        if vit
        else None,
        "deep text prompts (MaPLe text side), 2 tok.": lambda: MaPLe(
            bb, CLASSES, n_ctx=2, ctx_init=None, depth=min(9, bb.text_depth), couple_vision=False
        ),
    }


def main() -> None:
    """Print the table."""
    rows = []
    for name, pretrained in (("mmfl-mini", None), ("ViT-B-16", None)):
        bb = Backbone(name, pretrained=pretrained)
        full = sum(p.numel() for p in bb.model.parameters())
        for fam, part in families(bb).items():
            if part is None:  # VPT on a CNN tower
                rows.append((name, fam, None, None, None))
                continue
            n = sum(p.numel() for p in part().parameters())
            rows.append((name, fam, n, 4 * n, full / n))
    print(f"{'backbone':<10} {'family':<44} {'params':>10} {'bytes/round':>12} {'full model / part':>18}")
    for name, fam, n, b, ratio in rows:
        if n is None:
            print(f"{name:<10} {fam:<44} {'n/a (CNN tower: no tokens)':>42}")
        else:
            print(f"{name:<10} {fam:<44} {n:>10,} {b:>12,} {ratio:>18,.0f}")


if __name__ == "__main__":
    main()
