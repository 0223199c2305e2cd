"""mmfl-mini: built from installed packages, deterministic alignment, real zero-shot ability."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from mmfl.backbone import Backbone
from mmfl.backbones import build_mini, mini
from mmfl.data import Task
from mmfl.data.bundled import AnimalSilhouettes, SkimagePhotos
from mmfl.evaluation import zero_shot


def test_towers_equal_the_package_files(mini_backbone: Backbone) -> None:
    model = mini_backbone.model
    lite0 = [
        v
        for k, v in mini.lite0_state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")
    ]
    trunk = [v for k, v in model.visual.trunk.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(trunk) == len(lite0) == 245
    assert all(torch.equal(a, b) for a, b in zip(trunk, lite0, strict=True))
    minilm = load_file(mini.minilm_path() / "model.safetensors")
    text = model.text.transformer.state_dict()
    shared = [k for k in text if k in minilm]
    assert len(shared) == len(text) - ("embeddings.position_ids" in text)
    assert all(torch.equal(text[k], minilm[k]) for k in shared)
    assert torch.equal(model.text.proj.weight, load_file(build_mini.PROJ_FILE)[build_mini.PROJ_KEY])
    assert mini_backbone.embed_dim == 1280 and mini_backbone.text_width == 384
    assert torch.isclose(mini_backbone.logit_scale.exp(), torch.tensor(mini.LOGIT_SCALE))


def test_goes_through_open_clips_factory_with_lite0_preprocessing(mini_backbone: Backbone) -> None:
    import open_clip

    assert "mmfl-mini" in open_clip.list_models()
    assert isinstance(mini_backbone.model, open_clip.CustomTextCLIP)
    normalize = mini_backbone.preprocess_val.transforms[-1]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.5, 0.5, 0.5)


def test_embed_equivalence_on_the_real_text_tower(mini_backbone: Backbone) -> None:
    tokens = mini_backbone.tokenize(["a photo of a zebra.", "a sneaker", "an ankle boot"])
    with torch.no_grad():
        diff = mini_backbone.encode_text_embeds(mini_backbone.embed_tokens(tokens), tokens) - mini_backbone.encode_text(
            tokens
        )
    assert diff.abs().max().item() < 1e-5


def test_checkpoint_is_cached_and_reused(mini_backbone: Backbone) -> None:
    first = mini.checkpoint()
    mtime = first.stat().st_mtime_ns
    assert mini.checkpoint() == first and first.stat().st_mtime_ns == mtime


def test_projection_build_is_deterministic() -> None:
    def build_bytes() -> bytes:
        return save({"w": build_mini.build_text_projection(n_classes=40)})

    assert build_bytes() == build_bytes()


@pytest.mark.slow
def test_committed_projection_is_what_the_script_builds(tmp_path: Path) -> None:
    assert build_mini.main(["--out", str(tmp_path / "p.safetensors")]) == 0
    rebuilt = load_file(tmp_path / "p.safetensors")[build_mini.PROJ_KEY]
    committed = load_file(build_mini.PROJ_FILE)[build_mini.PROJ_KEY]
    assert rebuilt.shape == (1280, 384)
    assert torch.allclose(rebuilt, committed, atol=1e-5)


def test_wrong_pretrained_for_mini_is_an_error() -> None:
    with pytest.raises(ValueError, match="built offline from installed packages"):
        Backbone("mmfl-mini", pretrained="openai")


def test_zero_shot_beats_chance_beyond_luck(mini_backbone: Backbone) -> None:
    # 300 fixed silhouettes, 10 classes: at chance (10%) P(top-1 >= 20%) < 1e-6
    r = zero_shot(mini_backbone, Task("animals", AnimalSilhouettes()), limit=300, accelerator="cpu")
    assert r["n"] == 300 and r["chance"] == pytest.approx(0.1)
    assert r["top1"] >= 0.20, r
    # 16 photos, 16 classes: at chance (1/16) P(>= 6 right) < 1e-3
    p = zero_shot(mini_backbone, Task("photos", SkimagePhotos()), accelerator="cpu")
    assert p["n"] == 16 and p["top1"] >= 6 / 16, p


def test_zeroshot_command_prints_json() -> None:
    exe = Path(sys.executable).parent / "mmfl"
    out = subprocess.run(
        [str(exe), "zeroshot", "--backbone", "mmfl-mini", "--data", "photos", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.load(io.StringIO(out.stdout.strip().splitlines()[-1]))
    assert result["n"] == 16 and 0 <= result["top1"] <= 1 and result["chance"] == pytest.approx(1 / 16)


def test_zeroshot_command_on_a_local_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    from PIL import Image

    from mmfl import cli

    rng = np.random.default_rng(0)
    for cls in ("circle", "square", "star"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    args = ["zeroshot", "--backbone", "mmfl-tiny", "--data", str(tmp_path), "--split", "train", "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["classes"] == 3 and result["chance"] == pytest.approx(1 / 3)
    assert result["n"] == 6  # 9 images; one per class is held out as the test split
    assert cli.main(["zeroshot", "--data", str(tmp_path / "nothing-here")]) == 2
