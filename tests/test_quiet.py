"""A normal run shows mmfl's own lines only; ``-v`` shows other libraries' notices too."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from mmfl.quiet import quiet_third_party


def test_first_build_of_the_offline_backbone_prints_only_mmfl_lines(tmp_path: Path) -> None:
    """The first use assembles mmfl-mini (transformers' load report, open_clip's partial-init notice happen
    there); with a fresh cache, stderr must hold nothing but mmfl's own log lines."""
    env = {**os.environ, "MMFL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "mmfl", "zeroshot", "--data", "digits", "--limit", "20"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert any("assembling mmfl-mini" in line for line in lines)  # the build did happen in this run
    others = [line for line in lines if not re.match(r"^\d\d:\d\d:\d\d mmfl[.:]", line)]
    assert others == [], others
    assert "top-1" in p.stdout


@pytest.fixture
def mmfl_level():
    logger = logging.getLogger("mmfl")
    old = logger.level
    yield logger
    logger.setLevel(old)


def _notices(capfd, caplog) -> str:
    hf_logging.get_logger("transformers.modeling_utils").warning("BertModel LOAD REPORT from: x")
    logging.warning("Model x initialized partially.")
    logging.warning("a real problem")
    return capfd.readouterr().err + caplog.text


def test_quiet_third_party_hides_only_the_named_notices_and_restores(capfd, caplog, mmfl_level) -> None:
    mmfl_level.setLevel(logging.INFO)
    level = hf_logging.get_verbosity()
    with quiet_third_party("initialized partially"):
        seen = _notices(capfd, caplog)
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert "LOAD REPORT" not in seen and "initialized partially" not in seen
    assert "a real problem" in seen  # other warnings still reach the user
    assert hf_logging.get_verbosity() == level and hf_logging.is_progress_bar_enabled()
    caplog.clear()
    assert "initialized partially" in _notices(capfd, caplog)  # the filter is gone afterwards


def test_verbose_hides_nothing(capfd, caplog, mmfl_level) -> None:
    mmfl_level.setLevel(logging.DEBUG)  # what `mmfl -v` sets
    with quiet_third_party("initialized partially"):
        seen = _notices(capfd, caplog)
    assert "LOAD REPORT" in seen and "initialized partially" in seen
