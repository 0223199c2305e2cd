"""Shared fixtures: tiny open_clip backbones with random weights (native and HF text towers), offline."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and every process it starts
# computes on one thread: two workers of two threads each would contend for the cores (set before torch loads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import open_clip
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# mmfl-mini's assembled checkpoint, cached encodings and Flower node state go to a throw-away cache, never the user's
# home: made by the process that starts pytest (its xdist workers inherit the variable), removed when that one ends
if "MMFL_CACHE" not in os.environ:
    os.environ["MMFL_CACHE"] = tempfile.mkdtemp(prefix="mmfl-test-cache-")
    os.environ["MMFL_TEST_CACHE_OWNER"] = str(os.getpid())

import datasets

from mmfl.backbone import Backbone

datasets.disable_progress_bars()
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "an",
    "digit",
    "cat",
    "dog",
    "sea",
    "lion",
    "bird",
    "x",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the throw-away cache this process made (the suite leaves ~240 MB there)."""
    if os.environ.get("MMFL_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["MMFL_CACHE"], ignore_errors=True)


def _write_tiny_bert(folder: Path) -> None:
    """A 2-layer, 32-wide BERT with its own small word-piece vocabulary, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *letters, *[f"##{c}" for c in letters]]
    vocab += [w for w in WORDS if w not in vocab]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """``mmfl-tiny``: a native open_clip ViT + text transformer with random weights — the same weights whichever
    test asks first (seeded in a forked RNG, so the global one is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Backbone("mmfl-tiny")


@pytest.fixture(scope="session")
def mini_backbone() -> Backbone:
    """``mmfl-mini``: the offline default, assembled from installed packages."""
    return Backbone("mmfl-mini")


@pytest.fixture(scope="session")
def hf_backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """A ``CustomTextCLIP`` whose text tower is a tiny local HF BERT (random weights)."""
    root = tmp_path_factory.mktemp("hf")
    bert = root / "tiny-bert"
    _write_tiny_bert(bert)
    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {
            "hf_model_name": str(bert),
            "hf_tokenizer_name": str(bert),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 16,
        },
    }
    (root / "configs").mkdir()
    (root / "configs" / "test-hf-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    return Backbone("test-hf-tiny")
