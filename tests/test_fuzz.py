"""Property-based tests (hypothesis): arbitrary replies to the payload validator and arbitrary recipes to the
command give a valid result or one clear error, never a traceback from deep inside."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_inputs import BASE_RECIPE as BASE
from benchmarks.fuzz_inputs import paths as all_paths
from mmfl import cli
from mmfl.federated import FedAvg, Update, aggregate
from mmfl.federated.faults import validate_update

FUZZ = settings(
    derandomize=os.environ.get("MMFL_FUZZ_RANDOM") is None,  # the same examples on every CI run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SPEC = {"task/a/p": ((2, 3), torch.float32), "global/q": ((4,), torch.float32)}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.sampled_from([(2, 3), (4,), (3, 2), (1,), (), (2, 3, 1)]))
    dtype = draw(st.sampled_from(DTYPES))
    n = math.prod(shape)
    values = draw(
        st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n, max_size=n)
        if dtype.is_floating_point
        else st.lists(st.integers(0, 1), min_size=n, max_size=n)
    )
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


@st.composite
def replies(draw):
    keys = draw(st.lists(st.sampled_from([*SPEC, "local/x", "task/b/p", "", "global/q "]), unique=True, max_size=4))
    state = {k: draw(tensors() | st.sampled_from([None, 1.0, "x"])) for k in keys}
    n = draw(st.integers(-3, 100) | st.sampled_from([True, 2.5, "7", None]))
    return draw(st.sampled_from([Update("c", state, n), state, None, "reply"]))


def _good(reply) -> bool:
    if not isinstance(reply, Update) or isinstance(reply.num_examples, bool):
        return False
    if not isinstance(reply.num_examples, int) or reply.num_examples <= 0 or set(reply.state) != set(SPEC):
        return False
    for k, (shape, dtype) in SPEC.items():
        t = reply.state[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            return False
        if not torch.isfinite(t).all():
            return False
    return True


@FUZZ
@given(replies())
def test_the_validator_accepts_exactly_the_mergeable_replies(reply) -> None:
    problem = validate_update(reply, SPEC)  # never raises
    assert (problem is None) == _good(reply), problem
    if problem is None:
        honest = Update("h", {k: torch.zeros(s, dtype=d) for k, (s, d) in SPEC.items()}, 5)
        merged = aggregate([honest, reply], FedAvg())
        assert all(torch.isfinite(v).all() and tuple(v.shape) == SPEC[k][0] for k, v in merged.items())
    else:
        assert isinstance(problem, str) and problem


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["mmfl.prompts.CoOp", "torch.nn.Linear", "os.system", "no.such.Thing", "mmfl.data.Nothing"]),
    st.lists(st.integers(-2, 2), max_size=2),
    st.dictionaries(st.sampled_from(["class_path", "init_args", "x"]), st.integers(0, 3), max_size=2),
)


@st.composite
def recipes(draw) -> dict:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        paths = all_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "seed2", "alpha"]))] = draw(JUNK)
        else:
            parent[path[-1]] = draw(JUNK)
    return doc


@pytest.mark.slow
@settings(FUZZ, max_examples=int(os.environ.get("MMFL_FUZZ_EXAMPLES", "40")))
@given(doc=recipes())
def test_any_recipe_runs_or_fails_with_one_clear_error(doc: dict, tmp_path_factory, capsys) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    try:
        code = cli.main(["fit", "-c", str(recipe), "--output_dir", str(tmp / "run"), "--federation.rounds=1"])
    except SystemExit as e:  # the argument parser's own report: the error and the --help hint, exit 2
        code = e.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert (tmp / "run" / "global.safetensors").is_file() or not yaml.safe_load(
            (tmp / "run" / "config.yaml").read_text()
        )["parts"]
        return
    assert code == 2, err
    assert "error:" in err and "Traceback" not in err, err
    assert not (tmp / "run" / "metrics.csv").exists()  # refused before anything was written
    assert len(err) < 4000, err


def test_the_unpickler_of_data_files_refuses_code(tmp_path: Path) -> None:
    import io
    import pickle

    import numpy as np

    from mmfl.data.bundled import ArrayUnpickler

    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(ArrayUnpickler(io.BytesIO(pickle.dumps(arr))).load(), arr)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load builtins\.print"):
        ArrayUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
