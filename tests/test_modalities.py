"""Modality registry: entry points, registration, duplicates, broken plugins, autoload switch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmfl.modalities import (
    Modality,
    ModalityError,
    available_modalities,
    get_modality,
    get_modality_class,
    register_modality,
    unregister_modality,
)
from mmfl.modalities.image import ImageModality
from mmfl.modalities.registry import AUTOLOAD_ENV


class Sketch(ImageModality):
    name = "sketch"
    input_key = "sketch"


def _fake_distribution(root: Path, dist: str, entries: dict[str, str]) -> None:
    """A dist-info folder on sys.path: importlib.metadata finds its entry points like an installed one."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[mmfl.modalities]\n{lines}\n")


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_image_comes_from_mmfls_own_entry_point() -> None:
    assert available_modalities()["image"] == "mmfl"
    assert get_modality_class("image") is ImageModality
    assert isinstance(get_modality("image"), Modality)


def test_register_and_reject_duplicates() -> None:
    register_modality(Sketch)
    try:
        assert get_modality_class("sketch") is Sketch
        assert available_modalities()["sketch"] == "register_modality"
        with pytest.raises(ValueError, match="already registered"):
            register_modality(Sketch)
        with pytest.raises(ValueError, match="already registered"):
            register_modality(Sketch, name="image")  # an entry point's name is taken too
    finally:
        unregister_modality("sketch")
    with pytest.raises(ModalityError, match="unknown modality 'sketch'"):
        get_modality_class("sketch")


def test_unknown_modality_lists_the_available_ones() -> None:
    with pytest.raises(ModalityError, match=r"unknown modality 'smell'; available: .*image"):
        get_modality_class("smell")


def test_broken_plugin_is_named_and_does_not_stop_others(plugin_path: Path) -> None:
    (plugin_path / "broken_plugin_mod.py").write_text("raise ImportError('no module named fancy_lib')\n")
    _fake_distribution(plugin_path, "broken_plugin", {"brokenmod": "broken_plugin_mod:Broken"})
    assert available_modalities()["brokenmod"] == "broken_plugin"
    with pytest.raises(ModalityError, match=r"'brokenmod' from plugin 'broken_plugin'.*fancy_lib"):
        get_modality_class("brokenmod")
    assert get_modality_class("image") is ImageModality


def test_plugin_entry_point_loads_lazily(plugin_path: Path) -> None:
    (plugin_path / "depth_plugin_mod.py").write_text(
        "from mmfl.modalities.image import ImageModality\n"
        "class Depth(ImageModality):\n    name = 'depth'\n    input_key = 'depth'\n"
    )
    _fake_distribution(plugin_path, "depth_plugin", {"depth": "depth_plugin_mod:Depth"})
    assert "depth_plugin_mod" not in sys.modules  # listing does not import
    assert available_modalities()["depth"] == "depth_plugin"
    assert "depth_plugin_mod" not in sys.modules
    assert get_modality_class("depth").input_key == "depth"


def test_two_plugins_with_one_name_is_an_error(plugin_path: Path) -> None:
    _fake_distribution(plugin_path / "a", "plugin_a", {"twin": "a_mod:T"})
    _fake_distribution(plugin_path / "b", "plugin_b", {"twin": "b_mod:T"})
    sys.path[:0] = [str(plugin_path / "a"), str(plugin_path / "b")]
    try:
        with pytest.raises(ModalityError, match="'twin' is provided twice"):
            get_modality_class("twin")
    finally:
        sys.path.remove(str(plugin_path / "a"))
        sys.path.remove(str(plugin_path / "b"))


def test_missing_optional_dependency_is_named() -> None:
    class NeedsLib(ImageModality):
        name = "needs-lib"
        requires = ("surely_not_installed_pkg",)

    register_modality(NeedsLib)
    try:
        with pytest.raises(ModalityError, match="pip install surely_not_installed_pkg"):
            get_modality_class("needs-lib")
    finally:
        unregister_modality("needs-lib")


def test_autoload_switch_hides_third_party_plugins(plugin_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_distribution(plugin_path, "other_plugin", {"other": "other_mod:Other"})
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "other" not in available_modalities()
    assert "image" in available_modalities()
