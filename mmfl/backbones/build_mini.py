"""Build mmfl-mini's text projection: MiniLM sentence space → Lite0's ImageNet feature space.

``python -m mmfl.backbones.build_mini`` rewrites ``mmfl/backbones/mmfl_mini_text_proj.safetensors``.

The alignment needs no images. EfficientNet-Lite0's ImageNet classifier holds, for each of 1,000
classes, a weight vector ``W_k`` in its pooled-feature space (1280-d); an image's logit for class k is
``f · W_k + b_k``. MiniLM embeds each class's names. A ridge regression (closed form, float64) maps
the MiniLM embedding of a class's names to ``W_k``; applied to any text, it yields a "classifier
vector" for that text, so an image is scored against any class name by the cosine between its pooled
Lite0 features and the mapped text (DeViSE-style). Deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

RIDGE_LAMBDA = 1.0
PROJ_FILE = Path(__file__).parent / "mmfl_mini_text_proj.safetensors"
PROJ_KEY = "text.proj.weight"


def imagenet_texts(n_classes: int | None = None) -> list[list[str]]:
    """Per ImageNet class: its first name, its full synonym list, and ``"a photo of a <first name>."``."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    n = info.num_classes() if n_classes is None else n_classes
    out = []
    for i in range(n):
        desc = info.index_to_description(i)
        first = desc.split(",")[0].strip()
        out.append([first, desc, f"a photo of a {first}."])
    return out


@torch.no_grad()
def minilm_embed(texts: list[str], batch_size: int = 128) -> Tensor:
    """Mean-pooled, L2-normalised MiniLM embeddings of ``texts``. Returns [N, 384] float64."""
    from transformers import AutoModel, AutoTokenizer

    from mmfl.backbones.mini import minilm_path

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    outs = []
    for i in range(0, len(texts), batch_size):
        t = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        h = model(**t).last_hidden_state  # [B, L, 384]
        mask = t["attention_mask"].unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        outs.append((h * mask).sum(1) / mask.sum(1))
    return F.normalize(torch.cat(outs).double(), dim=-1)


def lite0_classifier() -> Tensor:
    """Lite0's ImageNet classifier weights [1000, 1280] from the installed package."""
    from mmfl.backbones.mini import lite0_state_dict

    sd = lite0_state_dict()
    return sd["_fc.weight"]


def build_text_projection(n_classes: int | None = None, lam: float = RIDGE_LAMBDA) -> Tensor:
    """Ridge map from MiniLM space to Lite0's classifier space.

    Returns:
        The weight of the text tower's ``nn.Linear(384, 1280, bias=False)`` projection, [1280, 384] float32.
    """
    texts = imagenet_texts(n_classes)
    n = len(texts)
    variants = len(texts[0])
    flat = [t[v] for v in range(variants) for t in texts]  # variant-major: [V*N]
    x = minilm_embed(flat)  # [V*N, 384]
    w = lite0_classifier()[:n].double()  # [N, 1280]
    y = w.repeat(variants, 1)  # [V*N, 1280], row v*N+k ↔ class k
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    p = torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)  # [384, 1280]
    return p.T.contiguous().float()  # [1280, 384]


def main(argv: list[str] | None = None) -> int:
    """Write the projection file (``--out``, default the committed one)."""
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJ_FILE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    weight = build_text_projection()
    save_file({PROJ_KEY: weight}, str(args.out), metadata={"ridge_lambda": str(RIDGE_LAMBDA)})
    log.info("wrote %s: %s %s", args.out, PROJ_KEY, tuple(weight.shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
