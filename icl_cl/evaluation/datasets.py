"""Dataset loading for evaluation: local JSONL folders or Hugging Face ``datasets``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from icl_cl.errors import ConfigError, DataError
from icl_cl.images import load_image
from icl_cl.inputs import read_examples, read_labels
from icl_cl.types import Example, Label


class HFSource(BaseModel):
    """A Hugging Face dataset (hub name or a ``save_to_disk`` folder) and its field mapping."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="hub name, or a path saved with Dataset(Dict).save_to_disk")
    config: str | None = None
    train_split: str = "train"
    test_split: str | None = Field(
        "test", description="null: hold out test_fraction of the train split (seeded)"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1)
    text: str | None = Field("text", description="field holding the text (null for image sets)")
    image: str | None = Field(None, description="field holding an image (HF Image feature)")
    label: str = Field("label", description="field holding a class id, a name, or a list of them")
    id: str | None = None


class DatasetSpec(BaseModel):
    """Where the data comes from and how much of it to use."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        None, description="folder with train.jsonl, dev.jsonl/test.jsonl, labels.jsonl"
    )
    test_file: str = "dev.jsonl"
    hf: HFSource | None = None
    max_train: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class Dataset:
    name: str
    train: list[Example]
    test: list[Example]
    labels: list[Label]

    @property
    def multi_label(self) -> bool:
        return any(len(ex.labels) != 1 for ex in self.train)


def sample_items(items: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded sample of ``n`` items in their original order (all items when ``n`` is None)."""
    if n is None or n >= len(items):
        return items
    rng = random.Random(seed)
    return (
        sorted(rng.sample(items, n), key=items.index)
        if n < 2000
        else [items[i] for i in sorted(rng.sample(range(len(items)), n))]
    )


def load_dataset(spec: DatasetSpec, base: Path | None = None) -> Dataset:
    """Load the dataset a spec names; relative paths are resolved against ``base``."""
    if (spec.path is None) == (spec.hf is None):
        raise ConfigError("dataset: give exactly one of 'path' or 'hf'")
    if spec.path is not None:
        folder = Path(spec.path)
        if base is not None and not folder.is_absolute():
            folder = base / folder
        if not folder.is_dir():
            raise ConfigError(f"dataset folder not found: {folder}")
        train, _ = read_examples(folder / "train.jsonl", max_chars=10**6)
        test, _ = read_examples(folder / spec.test_file, max_chars=10**6)
        labels = (
            read_labels(folder / "labels.jsonl")[0] if (folder / "labels.jsonl").exists() else []
        )
        name = folder.name
    else:
        assert spec.hf is not None
        name, train, test, labels = _load_hf(spec.hf, base, spec.seed)
    known = {lab.label for lab in labels}
    labels += [
        Label(lab)
        for lab in dict.fromkeys(x for ex in train for x in ex.labels)
        if lab not in known
    ]
    return Dataset(
        name=name,
        train=sample_items(train, spec.max_train, spec.seed),
        test=sample_items(test, spec.max_test, spec.seed + 1),
        labels=labels,
    )


def _check_hf_fields(data: Any, src: HFSource) -> None:
    """Refuse a dataset without the train split or the fields the spec names."""
    if not hasattr(data, "keys") or src.train_split not in data:
        have = list(data.keys()) if hasattr(data, "keys") else "a single split"
        raise ConfigError(f"dataset {src.name!r}: no split {src.train_split!r} (has {have})")
    columns = data[src.train_split].column_names
    if src.text is None and src.image is None:
        raise ConfigError(f"dataset {src.name!r}: set the text field, the image field, or both")
    for field in (src.text, src.image, src.label, src.id):
        if field is not None and field not in columns:
            raise ConfigError(f"dataset {src.name!r}: no field {field!r} (fields: {columns})")


def _hf_examples(data: Any, src: HFSource, split: str, names: list[str] | None) -> list[Example]:
    """The examples of one split (ClassLabel ids named by ``names``)."""
    if split not in data:
        raise ConfigError(f"dataset {src.name!r} has no split {split!r} (has {list(data)})")
    table = data[split]
    ids = list(table[src.id]) if src.id else None
    out = []
    n = len(table)
    texts = table[src.text] if src.text else [""] * n
    images = table[src.image] if src.image else [None] * n
    for i, (text, image, raw) in enumerate(zip(texts, images, table[src.label], strict=True)):
        values = raw if isinstance(raw, list) else [raw]
        # ClassLabel ids map to their names; -1 marks an unlabelled row in HF datasets.
        labels = [
            names[v] if names is not None and isinstance(v, int) else str(v)
            for v in values
            if not (isinstance(v, int) and v < 0)
        ]
        where = {"source": f"{src.name}[{split}]", "line": i + 1}
        if image is None and (not isinstance(text, str) or not text.strip()):
            raise DataError("empty text", field=src.text, **where)
        if isinstance(image, dict):  # an Image feature read without decoding
            image = image.get("bytes") or image.get("path")
        ident = str(ids[i]) if ids else f"{split}-{i}"
        if image is not None:
            image = load_image(image, item=ident, **where)
        out.append(Example(ident, text or "", labels, image=image))
    return out


def _load_hf(
    src: HFSource, base: Path | None, seed: int
) -> tuple[str, list[Example], list[Example], list[Label]]:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "Hugging Face datasets need the 'eval' extra: pip install icl-cl[eval]"
        ) from exc
    local = Path(src.name) if base is None or Path(src.name).is_absolute() else base / src.name
    if local.exists():
        data: Any = datasets.load_from_disk(str(local))
    else:
        data = datasets.load_dataset(src.name, src.config)
    _check_hf_fields(data, src)
    names: list[str] | None = None
    feature = data[src.train_split].features[src.label]
    inner = getattr(feature, "feature", feature)  # List/Sequence(ClassLabel) for multi-label sets
    if hasattr(inner, "names"):
        names = list(inner.names)

    labels = [Label(n) for n in names] if names else []
    train = _hf_examples(data, src, src.train_split, names)
    if src.test_split is not None:
        return Path(src.name).name, train, _hf_examples(data, src, src.test_split, names), labels
    # No test split (e.g. HWU64): hold out a seeded share of train.
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    cut = round(len(train) * src.test_fraction)
    held = set(order[:cut])
    return (
        Path(src.name).name,
        [ex for i, ex in enumerate(train) if i not in held],
        [ex for i, ex in enumerate(train) if i in held],
        labels,
    )
