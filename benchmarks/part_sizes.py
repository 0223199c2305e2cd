"""Trainable parameters and bytes sent per client per round for each part family, against full-model FedAvg.

``python -m benchmarks.part_sizes`` builds mmfl-mini (offline) and ViT-B-16 (random weights: only the
shapes matter) and prints one table; fp32 payloads, one direction.
"""

from __future__ import annotations

from mmfl.backbone import Backbone
from mmfl.prompts import ClipAdapter, CoOp, PaddingPrompt, ProjectionTuning

CLASSES = [f"class {i}" for i in range(10)]


def families(bb: Backbone) -> dict[str, object]:
    """One instance of each family with its usual settings (10 classes)."""
    pad = 30 if bb.image_size[0] >= 224 else 8
    return {
        "CoOp, 16 shared context vectors": CoOp(bb, CLASSES, n_ctx=16),
        "CoOp, class-specific, 4 x 10 classes": CoOp(bb, CLASSES, n_ctx=4, class_specific=True),
        "CLIP-Adapter, image side, r=4": ClipAdapter(bb, CLASSES, side="input"),
        "projection tuning, image side": ProjectionTuning(bb, CLASSES, side="input"),
        f"pixel padding prompt, {pad} px": PaddingPrompt(bb, CLASSES, pad=pad),
    }


def main() -> None:
    """Print the table."""
    rows = []
    for name, pretrained in (("mmfl-mini", None), ("ViT-B-16", None)):
        bb = Backbone(name, pretrained=pretrained)
        full = sum(p.numel() for p in bb.model.parameters())
        for fam, part in families(bb).items():
            n = sum(p.numel() for p in part.parameters())
            rows.append((name, fam, n, 4 * n, 4 * full / (4 * n)))
    print(f"{'backbone':<10} {'family':<38} {'params':>10} {'bytes/round':>12} {'full model / part':>18}")
    for name, fam, n, b, ratio in rows:
        print(f"{name:<10} {fam:<38} {n:>10,} {b:>12,} {ratio:>18,.0f}")


if __name__ == "__main__":
    main()
