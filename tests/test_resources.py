"""Missing resources and unreadable data: one clear message naming the source and the mend, or a counted skip."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets.config
import httpx
import huggingface_hub.constants
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from PIL import Image

from mmfl import cli
from mmfl.backbone import Backbone
from mmfl.data import HubDataset, ImageFolder
from mmfl.data.task import Task, prepare_task
from mmfl.hub import Unavailable, fetching, is_fetch_error
from mmfl.modalities.image import ImageModality


def _png(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (colour, 255 - colour, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, good: int = 6) -> Path:
    """``root/{train,test}/{a,b}/`` with ``good`` PNGs per split, and two bad files in train: one that is not an
    image at all and one PNG cut short."""
    for split in ("train", "test"):
        for i in range(good):
            folder = root / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(_png(40 * i))
    (root / "train" / "a" / "notes.png").write_bytes(b"written by a text editor")
    (root / "train" / "b" / "cut.png").write_bytes(_png(7)[:60])  # a valid header, then nothing
    return root


def test_image_validate_decodes_files_and_bytes(tmp_path: Path) -> None:
    modality = ImageModality()
    good = _png(10)
    (tmp_path / "g.png").write_bytes(good)
    modality.validate({"bytes": good, "path": None})
    modality.validate({"bytes": None, "path": str(tmp_path / "g.png")})
    modality.validate(Image.open(io.BytesIO(good)))  # already decoded: taken as it is
    with pytest.raises(ValueError, match=r"cannot decode image 'x.png': UnidentifiedImageError"):
        modality.validate({"bytes": b"nope", "path": "x.png"})
    with pytest.raises(ValueError, match=r"cannot decode image '<60 bytes>': OSError"):  # truncated
        modality.validate({"bytes": good[:60], "path": None})


def test_unreadable_images_fail_before_training_naming_them(tmp_path: Path) -> None:
    task = Task("pets", ImageFolder(str(_folder(tmp_path))), clients=2)
    with pytest.raises(ValueError) as e:
        prepare_task(task)
    msg = str(e.value)
    assert "task 'pets' (train split of imagefolder" in msg and "2 of 8 example(s) cannot be read" in msg
    assert "notes.png" in msg and "cut.png" in msg and "skip_undecodable: true" in msg


def test_skip_undecodable_leaves_them_out_and_says_so(tmp_path: Path, caplog) -> None:
    task = Task("pets", ImageFolder(str(_folder(tmp_path))), clients=2, skip_undecodable=True)
    with caplog.at_level(logging.WARNING, logger="mmfl"):
        prepared = prepare_task(task)
    assert sum(len(c.train) for c in prepared.clients) == 6 and len(prepared.test) == 6
    for client in prepared.clients:  # what is left decodes (datasets decodes on access)
        assert all(im.size == (16, 16) for im in client.train["image"])
    [warning] = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert "leaving out 2 of 8 example(s)" in warning and "notes.png" in warning and "cut.png" in warning


def test_zeroshot_skips_with_a_flag(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path)
    (data / "test" / "a" / "bad.png").write_bytes(b"")
    args = ["zeroshot", "--backbone", "mmfl-tiny", "--data", str(data), "--json"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfl zeroshot: error: task") and "bad.png" in err and "--skip_undecodable" in err
    assert cli.main([*args, "--skip_undecodable"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 6


def test_a_text_file_in_another_encoding(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_bytes("text,label\ncafé au lait,0\nnaïve,1\n".encode("latin-1"))
    source = HubDataset("csv", data_files=str(path), test_split=None, test_fraction=0.5, input_column="text")
    with pytest.raises(Unavailable, match=r"cannot read its files: file '.*notes.csv': UnicodeDecodeError.*UTF-8"):
        source.load()
    source.load_kwargs = {"encoding": "latin-1"}  # the mend the message gives
    dd = source.load()
    assert sorted(list(dd["train"]["text"]) + list(dd["test"]["text"])) == ["café au lait", "naïve"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without network with HF_HUB_OFFLINE=1 (the libraries read it when imported)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_weights_and_data_offline(offline) -> None:
    with pytest.raises(Unavailable) as e:
        Backbone("ViT-B-32", pretrained="openai")
    msg = str(e.value)
    assert msg.startswith("cannot fetch backbone 'ViT-B-32' with weights 'openai': offline mode is on")
    assert "HF_HUB_CACHE=" in msg and "a local checkpoint file" in msg and "mmfl-mini" in msg
    with pytest.raises(Unavailable, match=r"cannot fetch data set 'owner/name': offline mode .* mmfl.data.ImageFolder"):
        HubDataset("owner/name").load()


def test_fetching_converts_fetch_errors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # online, as a user's machine
    request = httpx.Request("GET", "https://huggingface.co/org/model")
    gated = GatedRepoError("Access to model org/model is restricted", response=httpx.Response(403, request=request))
    missing = RepositoryNotFoundError("Repository Not Found for url", response=httpx.Response(404, request=request))
    cases = [
        (gated, "it is gated: accept its terms on huggingface.co"),
        (missing, "no such repository on the Hub"),
        (ConnectionError("Couldn't reach 'a/b' on the Hub"), "cannot be reached"),
        (RuntimeError("Failed to download weights for tag 'openai'"), "cannot be reached"),
    ]
    for error, reason in cases:
        assert is_fetch_error(error)
        with pytest.raises(Unavailable) as e, fetching("model 'org/model'", "use a local file"):
            raise error
        assert str(e.value).startswith("cannot fetch model 'org/model': ") and reason in str(e.value)
        assert "; or use a local file." in str(e.value) and e.value.__cause__ is error
    for error in (ValueError("bad value"), KeyError("k"), RuntimeError("CUDA out of memory")):  # not a fetch
        assert not is_fetch_error(error)
        with pytest.raises(type(error)), fetching("x", "y"):
            raise error
