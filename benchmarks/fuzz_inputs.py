"""The inputs of :mod:`benchmarks.fuzz`: seeded random mutations of valid replies, checkpoints, command lines and
recipes."""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import yaml

BASE_RECIPE: dict[str, Any] = {
    "seed": 0,
    "backbone": {"model_name": "mmfl-tiny"},
    "tasks": [
        {
            "name": "digits",
            "data": {"class_path": "mmfl.data.SklearnDigits"},
            "clients": 2,
            "shots": 2,
            "max_test_examples": 10,
        }
    ],
    "parts": [{"class_path": "mmfl.prompts.CoOp", "init_args": {"n_ctx": 2}}],
    "training": {"max_steps": 1, "batch_size": 4, "accelerator": "cpu"},
    "federation": {"rounds": 1, "fraction": 1.0, "min_clients": 1},
}
"""A recipe that runs in about a second: mmfl-tiny, 2 clients × 2 shots, one step, one round."""

JUNK_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    3,
    -5,
    1e30,
    float("nan"),
    float("inf"),
    -0.5,
    "",
    "x",
    "☃",
    "../..",
    "mmfl.prompts.CoOp",
    "torch.nn.Linear",
    "os.system",
    "no.such.Thing",
    "mmfl.data.Nothing",
    [],
    [1, -2],
    {},
    {"class_path": 1},
    {"init_args": {"x": 1}},
]

JUNK_TOKENS = [
    "",
    "-",
    "--",
    "-c",
    "--x",
    "--output_dir",
    "nan",
    "-1",
    "1e99",
    "☃",
    "--federation.rounds=-1",
    "--federation.rounds=0",
    "--training.epochs=-1",
    "--training.max_steps=0",
    "--training.batch_size=0",
    "--seed=1.5",
    "--backbone.model_name=nope",
    "--tasks=[]",
    "--parts=[]",
    "--limit=-3",
    "--split=nope",
    "--data=/nonexistent",
    "--data=/etc/passwd",
    "/dev/null",
    "--resume",
    "--overwrite=true",
    "-q",
    "-v",
    "--help",
]


def random_reply(rng: random.Random, spec: dict[str, tuple[tuple[int, ...], Any]]) -> Any:
    """A client's reply: mostly an ``Update`` with some keys, shapes, dtypes, values or counts wrong."""
    import torch

    from mmfl.federated import Update

    dtypes = [torch.float32, torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]
    state: dict[str, Any] = {}
    for key, (shape, dtype) in spec.items():
        if rng.random() < 0.15:
            continue  # a missing key
        shape = shape if rng.random() < 0.7 else rng.choice([(), (1,), (3, 2), (2, 3, 1), (0,)])
        t = torch.randn(shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        if rng.random() < 0.2 and t.numel():
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf, 1e38])
        value: Any = t.to(dtype if rng.random() < 0.75 else rng.choice(dtypes))
        if rng.random() < 0.05:
            value = rng.choice([None, 1.0, "x", [1, 2], t.numpy()])
        state[key] = value
    if rng.random() < 0.15:
        state[rng.choice(["local/x", "task/b/p", "", "global/q ", "global/q/extra"])] = torch.zeros(2)
    n = 5 if rng.random() < 0.7 else rng.choice([0, -3, True, 2.5, "7", None, 10**12])
    return rng.choice([Update("c", state, n)] * 8 + [state, None, "reply"])


def mutate_checkpoint(rng: random.Random, data: bytes) -> bytes:
    """A safetensors checkpoint with bytes flipped, cut short, or a header entry or metadata value edited."""
    kind = rng.choice(["flip", "truncate", "header", "metadata", "length"])
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "length":  # the 8-byte header length itself
        return struct.pack("<Q", rng.choice([0, 1, 2**63, len(data), rng.randrange(2**32)])) + data[8:]
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    if kind == "header":
        key = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets", None])
        if field is None:
            del header[key]
        else:
            header[key][field] = rng.choice(["F64", "X", [-1], [1, 2, 3], [0, 10**12], [5, 1], None, "junk"])
    else:
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(sorted(meta) or ["round"])
        value = rng.choice(["", "-1", "x", "{}", "[]", "null", "1e99", json.dumps([[1, 2]]), '{"python": 1}'])
        meta[key] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_command(rng: random.Random, recipe: Path, run_dir: Path, out: Path) -> list[str]:
    """An ``mmfl`` command line, from a valid one of a cheap command, with 1–3 tokens dropped, repeated, swapped,
    replaced by junk, or junk inserted. Outputs go under ``out``."""
    tiny = ["--federation.rounds=1", "--training.max_steps=1"]
    bases = [
        ["fit", "-c", str(recipe), "--output_dir", str(out / "run"), *tiny],
        ["fit", "--resume", str(run_dir), "--federation.rounds=1"],
        ["zeroshot", "--backbone", "mmfl-tiny", "--data", "digits", "--limit", "8"],
        ["plot", str(run_dir)],
        ["flower-app", "-c", str(recipe), "--app_dir", str(out / "app")],
        ["export", str(run_dir), "--output", str(out / "export.safetensors"), "--limit", "8"],
        ["modalities"],
    ]
    argv = list(rng.choice(bases))
    for _ in range(rng.randint(1, 3)):
        action = rng.choice(["drop", "repeat", "swap", "replace", "insert"])
        i = rng.randrange(len(argv)) if argv else 0
        if action == "drop" and argv:
            del argv[i]
        elif action == "repeat" and argv:
            argv.insert(i, argv[i])
        elif action == "swap" and len(argv) > 1:
            j = rng.randrange(len(argv))
            argv[i], argv[j] = argv[j], argv[i]
        elif action == "replace" and argv:
            argv[i] = rng.choice(JUNK_TOKENS)
        else:
            argv.insert(i, rng.choice(JUNK_TOKENS))
    return argv


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict/list document (its leaves and inner nodes)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def mutate_recipe(rng: random.Random) -> str:
    """The base recipe's YAML with 1–3 values replaced, deleted or added, or (one in ten) its text damaged."""
    doc = copy.deepcopy(BASE_RECIPE)
    for _ in range(rng.randint(1, 3)):
        found = paths(doc)
        if not found:
            break
        path = rng.choice(found)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = rng.choice(["replace", "delete", "add"])
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[rng.choice(["extra", "seed2", "alpha", "scope", "epochs"])] = rng.choice(JUNK_VALUES)
        else:
            parent[path[-1]] = rng.choice(JUNK_VALUES)
    text = yaml.safe_dump(doc, allow_unicode=True)
    if rng.random() < 0.1:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice(["\t", ":", "- ", "{", "]", "\x00", "'", "&a *a", "\n  x"]) + text[i + 1 :]
    return text
