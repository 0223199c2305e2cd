"""WordNet noun glosses labelled by their supersense: a real offline text-classification set."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from mmfl.data.sources import DataSource, _split

WORDNET_DIR = "/usr/share/wordnet"
# Noun lexicographer files 4..28 (file 3, noun.Tops, holds the 51 unique beginners and is left out).
SUPERSENSES = [
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
]
_FIRST_LEXFILE = 4


def read_noun_glosses(path: str | Path) -> tuple[list[str], list[int]]:
    """Definitions and supersense labels (index into :data:`SUPERSENSES`) from WordNet's ``data.noun``.

    A gloss is cut before its usage examples (``; "..."``). Synsets of noun.Tops are skipped.
    """
    texts, labels = [], []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):  # the licence header
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                continue
            label = int(head.split(maxsplit=2)[1]) - _FIRST_LEXFILE
            if not 0 <= label < len(SUPERSENSES):
                continue
            definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
            if definition:
                texts.append(definition)
                labels.append(label)
    return texts, labels


class WordNetGlosses(DataSource):
    """82,000 WordNet noun definitions labelled with 25 supersenses (artifact, person, plant, animal, food,
    ...), from Debian's ``wordnet-base`` (WordNet licence, permissive). A text task: ``modality: text``.

    Install it with ``sudo apt-get install wordnet-base`` (optional: nothing else needs it). Classes are
    as unbalanced as the lexicon (artifact 11,587 synsets, motive 42); ``max_per_class`` caps them.

    Args:
        root: folder holding ``data.noun``.
        test_fraction: held-out share (stratified, fixed).
        max_per_class: keep at most this many definitions per class (a fixed subset), for speed.
        seed: seed of the split and the subset.
    """

    modality = "text"

    def __init__(
        self, root: str = WORDNET_DIR, test_fraction: float = 0.2, max_per_class: int | None = None, seed: int = 0
    ) -> None:
        super().__init__("text", "label")
        self.root, self.test_fraction, self.max_per_class, self.seed = root, test_fraction, max_per_class, seed
        if not (Path(root) / "data.noun").is_file():
            raise FileNotFoundError(
                f"WordNet not found in {root!r}: install it with `sudo apt-get install wordnet-base`, "
                "or pass root: <folder with data.noun>"
            )

    def load(self) -> datasets.DatasetDict:
        """Both splits of the glosses."""
        texts, labels = read_noun_glosses(Path(self.root) / "data.noun")
        y = np.asarray(labels)
        keep = np.arange(len(y))
        if self.max_per_class is not None:
            rng = np.random.default_rng(self.seed)
            keep = np.sort(
                np.concatenate(
                    [rng.permutation(np.flatnonzero(y == c))[: self.max_per_class] for c in range(len(SUPERSENSES))]
                )
            )
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=SUPERSENSES)}
        )
        ds = datasets.Dataset.from_dict(
            {"text": [texts[i] for i in keep], "label": y[keep].tolist()}, features=features
        )
        return _split(ds, self.test_fraction, self.seed, "label")
