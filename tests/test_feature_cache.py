"""The frozen-feature cache: hits, misses, reuse across runs through the disk, invalidation by backbone,
transform and data, and training with it equal to training without it."""

from __future__ import annotations

import functools
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, prepare_task
from mmfl.data.feature_cache import FeatureCache, example_digest
from mmfl.data.loader import make_loader
from mmfl.federated import Federation, LocalTraining, Simulation
from mmfl.federated.settings import seed_all
from mmfl.modalities.image import ImageModality
from mmfl.prompts import CoOp, VisualPromptTokens


def _images(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(n)]}, features=feats)


def _direct(bb: Backbone, modality: ImageModality, ds: datasets.Dataset) -> torch.Tensor:
    loader = make_loader(ds, "image", modality.transform(bb, False), 4, False)
    with torch.no_grad():
        return torch.cat([modality.encode(bb, b["image"], []) for b in loader])


def test_hits_misses_and_reuse_across_runs_through_the_disk(tiny_backbone: Backbone, tmp_path) -> None:
    ds, img = _images(10), ImageModality()
    cache = FeatureCache(tiny_backbone, tmp_path, batch_size=4)
    first = cache.encodings(img, ds, train=True)
    assert (cache.misses, cache.hits) == (10, 0)
    assert torch.allclose(first, _direct(tiny_backbone, img, ds), atol=1e-5)
    again = cache.encodings(img, ds.select([3, 1, 3]), train=False)  # eval transform = train transform here
    assert (cache.misses, cache.hits) == (10, 3)
    assert torch.equal(again, first[[3, 1, 3]])
    fresh = FeatureCache(tiny_backbone, tmp_path, batch_size=4)  # another run: everything comes from the file
    assert torch.equal(fresh.encodings(img, ds, train=True), first)
    assert (fresh.misses, fresh.hits) == (0, 10)


def test_an_encoding_does_not_depend_on_what_was_missing_with_it(tiny_backbone: Backbone, tmp_path) -> None:
    """A cold cache encodes 9 inputs in batches of 4, 4 and 1; one that was asked for inputs 8 and 7 first, then
    for all, encodes them in batches of 2, then 4 and 3. A ViT's matrix products round small batches
    differently, so unpadded batches gave other bits; padded to the full size, the two caches agree
    bit for bit (so a run's figures do not depend on whether the cache was empty when it started)."""
    ds, img = _images(9), ImageModality()
    at_once = FeatureCache(tiny_backbone, None, batch_size=4).encodings(img, ds, train=False)  # [9, D]
    piecewise = FeatureCache(tiny_backbone, None, batch_size=4)
    first = piecewise.encodings(img, ds.select([8, 7]), train=False)
    assert piecewise.misses == 2 and torch.equal(first, at_once[[8, 7]])
    assert torch.equal(piecewise.encodings(img, ds, train=False), at_once)
    assert piecewise.misses == 9
    # the encoding batch size is part of the key: another size is another store, never these entries
    other = FeatureCache(tiny_backbone, tmp_path, batch_size=3)
    assert other.store_key(img, False) != FeatureCache(tiny_backbone, tmp_path, batch_size=4).store_key(img, False)
    assert torch.allclose(other.encodings(img, ds, train=False), at_once, atol=1e-5)


def test_encoding_leaves_the_global_random_state_alone(tiny_backbone: Backbone) -> None:
    """A cold cache encodes (its DataLoader draws from the global generator when it starts), a warm one does not:
    what is drawn after either must be the same, or a run would depend on the cache's state."""
    ds, img = _images(5), ImageModality()
    cache = FeatureCache(tiny_backbone, None, batch_size=4)
    torch.manual_seed(7)
    cold = cache.encodings(img, ds, train=False)
    after_cold = torch.rand(3)
    torch.manual_seed(7)
    warm = cache.encodings(img, ds, train=False)
    assert cache.misses == 5 and cache.hits == 5 and torch.equal(cold, warm)
    assert torch.equal(torch.rand(3), after_cold)


def test_invalidated_by_backbone_transform_and_data(tiny_backbone: Backbone, tmp_path) -> None:
    ds, img = _images(6), ImageModality()
    FeatureCache(tiny_backbone, tmp_path).encodings(img, ds, train=False)
    # another backbone: the same config and name, other (random) weights
    seed_all(123)
    other = Backbone("mmfl-tiny")
    c = FeatureCache(other, tmp_path)
    out = c.encodings(img, ds, train=False)
    assert c.misses == 6 and torch.allclose(out, _direct(other, img, ds), atol=1e-5)
    # another transform: augmentation makes training encodings random, so they are never cached
    aug = ImageModality(augment=True)
    assert FeatureCache(tiny_backbone, tmp_path).encodings(aug, ds, train=True) is None
    assert aug.cache_id(tiny_backbone, True) is None and aug.cache_id(tiny_backbone, False) is not None
    # changed data: only the changed example is recomputed
    changed = _images(6)
    arr = np.array(changed[2]["image"])
    arr[0, 0] = 255 - arr[0, 0]
    rows = [changed[i]["image"] for i in range(6)]
    rows[2] = Image.fromarray(arr)
    changed = datasets.Dataset.from_dict({"image": rows, "label": changed["label"]}, features=changed.features)
    c = FeatureCache(tiny_backbone, tmp_path)
    c.encodings(img, changed, train=False)
    assert (c.misses, c.hits) == (1, 5)


def test_digests_tell_values_apart() -> None:
    assert example_digest({"bytes": b"ab", "path": None}) != example_digest({"bytes": b"ac", "path": None})
    assert example_digest("ab") != example_digest(["a", "b"])
    assert example_digest([1.0, 2.0]) == example_digest([1.0, 2.0])


def test_a_damaged_cache_file_is_recomputed(tiny_backbone: Backbone, tmp_path, caplog) -> None:
    ds, img = _images(4), ImageModality()
    FeatureCache(tiny_backbone, tmp_path).encodings(img, ds, train=False)
    (f,) = tmp_path.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:50])
    c = FeatureCache(tiny_backbone, tmp_path)
    with caplog.at_level(logging.WARNING):
        out = c.encodings(img, ds, train=False)
    assert c.misses == 4 and "unreadable" in caplog.text
    assert torch.allclose(out, _direct(tiny_backbone, img, ds), atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    return [prepare_task(Task("digits", SklearnDigits(), clients=2, shots=4, max_test_examples=20))]


def _run(bb: Backbone, tasks, part, cache: str) -> tuple[Simulation, int]:
    calls = {"n": 0}
    encode = bb.encode_image

    def counting(*a, **k):
        calls["n"] += 1
        return encode(*a, **k)

    training = LocalTraining(
        epochs=2, batch_size=8, accelerator="cpu", feature_cache=cache, optimizer=lambda p: torch.optim.SGD(p, lr=0.5)
    )
    seed_all(0)
    sim = Simulation(bb, tasks, [part], training, Federation(rounds=2))
    sim.run_round(1)
    sim.evaluate_tasks(1)
    bb.encode_image = counting
    try:
        sim.run_round(2)
        sim.evaluate_tasks(2)
    finally:
        del bb.encode_image
    return sim, calls["n"]


def test_training_with_the_cache_equals_training_without(tiny_backbone: Backbone, digits) -> None:
    coop = functools.partial(CoOp, n_ctx=2)
    cached, calls_cached = _run(tiny_backbone, digits, coop, "memory")
    plain, calls_plain = _run(tiny_backbone, digits, coop, "off")
    assert calls_cached == 0 and calls_plain > 0  # round 2 and evaluation ran no image encoder at all
    for k in plain.global_state:
        assert torch.allclose(cached.global_state[k], plain.global_state[k], atol=1e-5), k
    assert cached.features.hits > 0


def test_parts_inside_the_encoder_turn_the_cache_off(tiny_backbone: Backbone, digits) -> None:
    vpt = functools.partial(VisualPromptTokens, n_tokens=2)
    sim, calls = _run(tiny_backbone, digits, vpt, "memory")
    assert calls > 0 and sim.features.hits == sim.features.misses == 0


def test_cache_mode_is_checked_in_one_place(tiny_backbone) -> None:
    """The recipe check and the simulation share one check of ``training.feature_cache``."""
    from mmfl.data.feature_cache import make_feature_cache

    with pytest.raises(ValueError, match="'disk', 'memory' or 'off', got 'fast'"):
        make_feature_cache(tiny_backbone, "fast", "cpu", 8)
    assert make_feature_cache(tiny_backbone, "off", "cpu", 8) is None
    memory = make_feature_cache(tiny_backbone, "memory", "cpu", 8)
    assert memory is not None and memory.directory is None
