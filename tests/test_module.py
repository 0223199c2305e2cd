"""ClientModule: logits, trainable state with scope-qualified keys, and checkpoints without the backbone."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from mmfl.backbone import Backbone
from mmfl.data import SklearnDigits, Task, make_loader, prepare_task
from mmfl.modalities import get_modality
from mmfl.module import ClientModule, make_trainer, quiet_lightning, zero_shot_text_features
from mmfl.prompts import CoOp

NAMES = ["cat", "dog", "bird"]


def _module(bb: Backbone, **coop_kwargs) -> ClientModule:
    parts = [CoOp(bb, NAMES, n_ctx=2, **coop_kwargs)]
    return ClientModule(bb, get_modality("image"), "pets", NAMES, parts)


def test_logits_are_scaled_cosines(tiny_backbone: Backbone) -> None:
    m = _module(tiny_backbone)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f_x = F.normalize(tiny_backbone.encode_image(x), dim=-1)
        f_t = F.normalize(m.parts["coop"].class_text_features(), dim=-1)
        expected = tiny_backbone.logit_scale.exp() * f_x @ f_t.T
        assert torch.allclose(m(x), expected, atol=1e-6)


def test_zero_shot_features_without_a_text_part(tiny_backbone: Backbone) -> None:
    m = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, [], templates=["a {}.", "the {}."])
    feats = m.class_text_features()
    manual = []
    for c in NAMES:
        t = F.normalize(tiny_backbone.encode_text(tiny_backbone.tokenize([f"a {c}.", f"the {c}."])), dim=-1)
        manual.append(F.normalize(t.mean(0), dim=-1))
    assert torch.allclose(feats, torch.stack(manual), atol=1e-6)
    assert torch.allclose(feats, zero_shot_text_features(tiny_backbone, NAMES, ["a {}.", "the {}."]))
    with pytest.raises(ValueError, match="nothing to train"):
        m.configure_optimizers()


def test_trainable_state_keys_are_scope_qualified(tiny_backbone: Backbone) -> None:
    m = _module(tiny_backbone)
    assert m.trainable_keys() == ["task/pets/coop.ctx"]
    g = _module(tiny_backbone, scope="global")
    assert g.trainable_keys() == ["global/coop.ctx"]
    local = _module(tiny_backbone, scopes={"ctx": "local"})
    assert local.trainable_keys() == ["local/coop.ctx"]
    assert local.trainable_state_dict(include_local=False) == {}
    assert list(local.trainable_state_dict(local_only=True)) == ["local/coop.ctx"]
    assert m.trainable_state_dict(local_only=True) == {}  # a shared tensor is not copied for nothing
    mixed = ClientModule(
        tiny_backbone, get_modality("image"), "pets", NAMES, [CoOp(tiny_backbone, NAMES, n_ctx=2, local_rank=1)]
    )
    assert sorted(mixed.trainable_state_dict(local_only=True)) == ["local/coop.local_u", "local/coop.local_v"]
    assert sorted(mixed.trainable_state_dict()) == ["local/coop.local_u", "local/coop.local_v", "task/pets/coop.ctx"]


def test_load_trainable_state(tiny_backbone: Backbone) -> None:
    m = _module(tiny_backbone)
    new = torch.full_like(m.parts["coop"].ctx, 0.5)
    assert m.load_trainable_state_dict({"task/pets/coop.ctx": new, "task/other/coop.ctx": new}) == [
        "task/pets/coop.ctx"
    ]
    assert torch.equal(m.parts["coop"].ctx.detach(), new)
    with pytest.raises(ValueError, match="expected shape"):
        m.load_trainable_state_dict({"task/pets/coop.ctx": torch.zeros(3)})
    with pytest.raises(KeyError, match="state has no tensor"):
        m.load_trainable_state_dict({}, strict=True)


def test_parts_need_distinct_names(tiny_backbone: Backbone) -> None:
    parts = [CoOp(tiny_backbone, NAMES, n_ctx=2), CoOp(tiny_backbone, NAMES, n_ctx=2)]
    with pytest.raises(ValueError, match="distinct names"):
        ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, parts)


def test_lightning_fit_trains_only_parts_and_checkpoint_has_no_backbone(tiny_backbone: Backbone, tmp_path) -> None:
    task = prepare_task(Task("digits", SklearnDigits(), max_test_examples=20, shots=3))
    parts = [CoOp(tiny_backbone, task.class_names, n_ctx=2)]
    m = ClientModule(tiny_backbone, get_modality("image"), "digits", task.class_names, parts)
    frozen_before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    ctx_before = m.parts["coop"].ctx.detach().clone()
    tf = get_modality("image").transform(tiny_backbone, True)
    loader = make_loader(task.clients[0].train, "image", tf, batch_size=8, shuffle=True)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, loader)
    assert not torch.equal(m.parts["coop"].ctx.detach(), ctx_before)
    # the epoch's means reach Lightning's loggers and callbacks (log_train_metrics defaults to True)
    assert set(m.epoch_metrics) == {"train_loss", "train_acc"}
    for k, v in m.epoch_metrics.items():
        assert float(trainer.callback_metrics[k]) == pytest.approx(float(v))
    assert not tiny_backbone.model.training  # Lightning's train() did not reach the frozen model
    for k, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k
    trainer.save_checkpoint(tmp_path / "client.ckpt")
    ckpt = torch.load(tmp_path / "client.ckpt", weights_only=True)
    assert list(ckpt["state_dict"]) == ["parts.coop.ctx"]
    assert m.backbone is tiny_backbone


def test_public_api_resolves() -> None:
    import mmfl

    for name in mmfl.__all__:
        assert getattr(mmfl, name) is not None, name
    assert mmfl.Backbone is Backbone and mmfl.CoOp is CoOp


def test_trainers_on_cuda_keep_the_memory_cache_between_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """One fit per client per round: Lightning's CUDA accelerator empties the memory cache and frees the cuBLAS
    workspaces when every fit starts and ends, so every client would allocate again; mmfl's keeps them. CPU runs
    stay on the CPU; other accelerators are Lightning's."""
    from types import SimpleNamespace

    from lightning.fabric.accelerators import cuda as fabric_cuda
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from mmfl.module import _placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    acc, strategy = _placement("cpu")
    assert acc == "cpu" and isinstance(strategy, SingleDeviceStrategy) and strategy.root_device.type == "cpu"
    for name in ("auto", "tpu", "mps"):  # not mmfl's business: Lightning decides (and checks)
        assert _placement(name) == (name, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    acc, strategy = _placement("auto")
    assert isinstance(acc, CUDAAccelerator) and strategy.root_device == torch.device("cuda", 0)
    assert _placement("gpu")[1].root_device.type == "cuda" and _placement("cpu")[0] == "cpu"

    def refuse() -> None:
        raise AssertionError("the CUDA cache was emptied")

    monkeypatch.setattr(fabric_cuda, "_clear_cuda_memory", refuse)
    monkeypatch.setattr(torch.cuda, "empty_cache", refuse)
    acc.setup(SimpleNamespace(local_rank=0))  # keeps the cache when a fit starts
    acc.teardown()  # and when it ends
    for call in (lambda: CUDAAccelerator().setup(SimpleNamespace(local_rank=0)), CUDAAccelerator().teardown):
        with pytest.raises(AssertionError, match="emptied"):
            call()  # Lightning's own empties it both times


def test_trainers_leave_the_client_module_on_its_device(tiny_backbone: Backbone, monkeypatch) -> None:
    """Lightning moves the module back to the CPU after every fit (and to the device again before the next one);
    mmfl's trainers leave it where it is. Shown on the CPU: ``module.cpu()`` is never called."""
    task = prepare_task(Task("digits", SklearnDigits(), max_test_examples=20, shots=2))
    m = ClientModule(
        tiny_backbone,
        get_modality("image"),
        "digits",
        task.class_names,
        [CoOp(tiny_backbone, task.class_names, n_ctx=2)],
    )
    loader = make_loader(task.clients[0].train, "image", get_modality("image").transform(tiny_backbone, True), 8, True)
    moves = []
    monkeypatch.setattr(ClientModule, "cpu", lambda self: moves.append("cpu") or self)
    with quiet_lightning():
        make_trainer(accelerator="cpu").fit(m, loader)
        make_trainer(accelerator="cpu").test(m, loader, verbose=False)
        assert moves == []
        L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
        ).fit(m, loader)
    assert moves == ["cpu"]  # Lightning's default strategy does move it


def test_a_label_outside_the_classes_fails_the_step(tiny_backbone: Backbone) -> None:
    """The accuracy metrics skip torchmetrics' per-batch label check (a device sync each step); the cross-entropy,
    computed first, still refuses a label outside [0, C)."""
    m = ClientModule(tiny_backbone, get_modality("image"), "pets", NAMES, [CoOp(tiny_backbone, NAMES, n_ctx=2)])
    x = torch.zeros(2, 3, tiny_backbone.image_size[0], tiny_backbone.image_size[1])
    m.on_train_epoch_start()
    m.training_step({"image": x, "label": torch.tensor([0, len(NAMES) - 1])}, 0)  # in range: fine
    with pytest.raises(IndexError, match="out of bounds"):
        m.training_step({"image": x, "label": torch.tensor([0, len(NAMES)])}, 0)
