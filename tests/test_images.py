"""Images through the whole path: real Fashion-MNIST pictures, a tiny random-weight CLIP for the
ECL (and a tiny random-weight vision-language model for the LLM stage), a real store.

With random weights accuracy means nothing; what is checked is that every step runs for real and
keeps what it must: identical pictures find their own label, the store holds the image bytes,
and bad input is refused with the item named and nothing changed.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from icl_cl import ContinualClassifier
from icl_cl.cli import main
from icl_cl.config import ClassifierConfig, EmbedderConfig, MemoryConfig
from icl_cl.errors import DataError
from icl_cl.images import Image, load_image
from icl_cl.inputs import read_examples
from icl_cl.types import Example, Label
from tests.fashion_mnist import CLASSES, load_pictures
from tests.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def config(clip_model: Path) -> ClassifierConfig:
    return ClassifierConfig(embedder=EmbedderConfig(model=str(clip_model), batch_size=8))


@pytest.fixture(scope="module")
def pictures() -> dict[str, list[Image]]:
    """Four real pictures per class: three to learn, one to ask about."""
    by_class: dict[str, list[Image]] = {c: [] for c in CLASSES}
    for p in load_pictures(per_class=4):
        by_class[p.label].append(load_image(p.png))
    return by_class


def _session(pictures: dict[str, list[Image]], classes: tuple[str, ...]) -> list[Example]:
    return [
        Example(f"{c}-{i}", labels=[c], image=img)
        for c in classes
        for i, img in enumerate(pictures[c][:3])
    ]


def test_images_learned_in_two_sessions_are_stored_and_predicted(tmp_path, config, pictures):
    clf = ContinualClassifier.open(tmp_path / "store", config)
    labels = [Label(c, description=f"a photo of a {c.lower()}") for c in CLASSES]
    first, second = CLASSES[:5], CLASSES[5:]
    clf.learn(_session(pictures, first), labels[:5])
    clf.learn(_session(pictures, second), labels[5:])
    clf.close()

    # What was acknowledged, read back; one voting neighbour, so identity is what is checked.
    clf = ContinualClassifier.open(tmp_path / "store", memory=MemoryConfig(knn_neighbors=1))
    assert clf.memory.n_examples == 30
    stored = clf.memory.store.examples(range(30))
    learned = _session(pictures, first) + _session(pictures, second)
    for got, want in zip(stored, learned, strict=True):
        assert got.id == want.id and got.labels == want.labels
        assert got.image is not None and got.image.data == want.image.data
        assert got.text == ""

    # A stored picture is its own nearest neighbour: the kNN vote gives back its label.
    asked = [ex.image for ex in learned[::3]]
    preds = clf.predict(asked, k=3, scorer="knn")
    assert [p.labels[0] for p in preds] == [ex.labels[0] for ex in learned[::3]]
    # Texts and pictures share the store when the embedder reads both.
    clf.learn([Example("caption", "a leather shoulder bag", ["Bag"])])
    assert clf.memory.store.input_keys()[-1] == "a leather shoulder bag"
    assert clf.memory.store.input_keys()[0] == learned[0].image.key
    # Unseen pictures get three known candidates; a PIL image, bytes and a path give the same.
    unseen = pictures["Bag"][3]
    path = tmp_path / "bag.png"
    path.write_bytes(unseen.data)
    ways = [unseen, unseen.pil(), unseen.data, path]
    ranked = [[c.label for c in p.candidates] for p in clf.predict(ways, k=3)]
    assert len(ranked[0]) == 3 and set(ranked[0]) <= set(CLASSES)
    assert all(r == ranked[0] for r in ranked)
    clf.close()


def test_labels_alone_give_zero_shot_candidates_for_an_image(tmp_path, config, pictures):
    """Label names live in the same space: label retrieval ranks labels before any picture of
    them was learned."""
    clf = ContinualClassifier.open(tmp_path / "store", config)
    clf.learn([], [Label(c) for c in CLASSES])
    vector = clf.embedder.encode([pictures["Coat"][0]])
    cosines, columns = clf.memory.retrieve_labels(vector, 4)
    found = [clf.memory.labels[j].label for j in columns[0]]
    assert len(set(found)) == 4 and set(found) <= set(CLASSES)
    assert np.all(np.diff(cosines[0]) <= 0)  # nearest label first
    clf.close()


def test_jsonl_image_paths_are_relative_to_the_file_and_work_from_the_cli(
    tmp_path, config, pictures
):
    folder = tmp_path / "data"
    (folder / "pics").mkdir(parents=True)
    rows, inputs = [], []
    for c in CLASSES[:4]:
        for i, img in enumerate(pictures[c][:2]):
            (folder / "pics" / f"{c[:3]}{i}.png").write_bytes(img.data)
            rows.append({"id": f"{c}{i}", "image": f"pics/{c[:3]}{i}.png", "labels": [c]})
        inputs.append({"id": c, "image": f"pics/{c[:3]}0.png"})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "ask.jsonl").write_text("\n".join(json.dumps(r) for r in inputs) + "\n")
    examples, _ = read_examples(folder / "train.jsonl", max_chars=1000)
    assert examples[0].image == load_image(pictures[CLASSES[0]][0].data)

    cfg = tmp_path / "clip.yaml"
    one_neighbour = config.model_copy(update={"memory": MemoryConfig(knn_neighbors=1)})
    cfg.write_text(yaml.safe_dump(one_neighbour.model_dump(mode="json")))
    store, out = tmp_path / "store", tmp_path / "pred.jsonl"
    args = ["--store", str(store), "--data", str(folder / "train.jsonl"), "--config", str(cfg)]
    assert main(["-q", "learn", *args]) == 0
    ask = ["--store", str(store), "--input", str(folder / "ask.jsonl"), "--output", str(out)]
    assert main(["-q", "predict", *ask, "--k", "3", "--scorer", "knn"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    # Each question is a learned picture: its own label comes back.
    assert [a["labels"] for a in answers] == [[c] for c in CLASSES[:4]]


def _png_bytes(fmt: str) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_bad_images_are_refused_by_item_and_change_nothing(tmp_path, config, pictures, embedder):
    clf = ContinualClassifier.open(tmp_path / "store", config)
    clf.learn(_session(pictures, CLASSES[:2]))
    before = (clf.memory.n_examples, len(clf.memory.store.sessions()))

    good = pictures["Dress"][0]
    truncated = good.data[: len(good.data) // 2]
    cases = {
        "corrupt or truncated": truncated,
        "unsupported image format TIFF": _png_bytes("TIFF"),
        "not an image": b"this is plain text, not a picture",
    }
    for reason, data in cases.items():  # the API checks an image when the example is made
        with pytest.raises(DataError, match=reason) as err:
            Example("bad-one", labels=["Dress"], image=data)
        assert err.value.item == "bad-one" and err.value.field == "image"

    (tmp_path / "ok.png").write_bytes(good.data)
    (tmp_path / "half.png").write_bytes(truncated)
    for name, reason in [("missing.png", "no such file"), ("half.png", "corrupt or truncated")]:
        rows = [
            {"id": "ok", "image": "ok.png", "labels": ["Dress"]},
            {"id": "bad", "image": name, "labels": ["Dress"]},
        ]
        data = tmp_path / "train.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        with pytest.raises(DataError, match=f"{re.escape(name)}: {reason}") as err:
            read_examples(data, max_chars=100)
        assert err.value.line == 2 and err.value.item == "bad"
        assert main(["-q", "learn", "--store", str(tmp_path / "store"), "--data", str(data)]) == 4

    # Asking with a bad image fails before any work, naming its position.
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        clf.predict([good, truncated])
    assert err.value.item == "1"
    assert (clf.memory.n_examples, len(clf.memory.store.sessions())) == before
    clf.close()

    # A text-only embedder refuses pictures, naming the first, and its store stays empty.
    text_clf = ContinualClassifier.open(tmp_path / "text-store", embedder=embedder)
    with pytest.raises(DataError, match="reads text only") as err:
        text_clf.learn(
            [Example("t", "a red dress", ["Dress"]), Example("p", labels=["Dress"], image=good)]
        )
    assert err.value.item == "p"
    assert text_clf.memory.n_examples == 0
    text_clf.close()


def test_an_image_sent_to_a_text_only_llm_is_refused_before_any_work(tmp_path, config, pictures):
    from tests.tiny_models import tiny_backend

    with_llm = config.model_copy(
        update={"llm": ClassifierConfig.model_validate({"llm": {"model": "tiny"}}).llm}
    )
    clf = ContinualClassifier.open(tmp_path / "store", with_llm, backend=tiny_backend())
    clf.learn(_session(pictures, CLASSES[:3]))
    with pytest.raises(DataError, match="reads text only") as err:
        clf.predict(["a text is fine", pictures["Trouser"][3]])
    assert err.value.item == "1"
    # Without the LLM stage the ECL classifies the same picture.
    assert clf.predict([pictures["Trouser"][3]], use_llm=False)[0].labels
    assert np.isfinite(
        [c.score for c in clf.predict([pictures["Trouser"][0]], use_llm=False)[0].candidates]
    ).all()
    clf.close()


def test_an_image_dataset_saved_to_disk_runs_the_class_incremental_protocol(
    tmp_path, clip_model, pictures
):
    """The eval harness on pictures: a Hugging Face Image column, sessions by random label
    groups, the CLIP ECL, and the joint check (which must agree with the incremental run)."""
    datasets = pytest.importorskip("datasets")
    from icl_cl.evaluation.datasets import load_dataset
    from icl_cl.evaluation.protocol import EvalConfig, run_protocol

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
    )

    def split(rows: slice) -> object:
        items = [(img, i) for i, c in enumerate(CLASSES) for img in pictures[c][rows]]
        return datasets.Dataset.from_dict(
            {"img": [img.pil() for img, _ in items], "label": [i for _, i in items]},
            features=features,
        )

    datasets.DatasetDict({"train": split(slice(0, 3)), "test": split(slice(3, 4))}).save_to_disk(
        str(tmp_path / "pictures")
    )
    config = EvalConfig.from_dict(
        {
            "name": "pictures",
            "dataset": {"hf": {"name": "pictures", "text": None, "image": "img"}},
            "sessions": {"by": "random", "n": 2, "seed": 0},
            "k": 3,
            "classifier": {"embedder": {"model": str(clip_model), "batch_size": 8}},
            "methods": [{"name": "ecl-ncm", "scorer": "ncm"}],
        }
    )
    data = load_dataset(config.dataset, tmp_path)
    assert len(data.train) == 30 and all(ex.image is not None for ex in data.train)
    assert data.train[0].image.size == (28, 28)
    results = run_protocol(config, tmp_path / "run", tmp_path)
    stages = results["methods"]["ecl-ncm"]["stages"]
    assert [s["n_test"] for s in stages] == [5, 10]
    assert results["methods"]["ecl-ncm"]["summary"]["joint_agreement"] == 1.0


@pytest.fixture(scope="module")
def vlm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_vlm import build_tiny_vlm, smollm2_tokenizer

    cache = getattr(request.config, "cache", None)
    tok_cache = Path(cache.mkdir("icl-cl-smollm2-tokenizer")) if cache is not None else None
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), smollm2_tokenizer(tok_cache))


def test_a_vision_language_model_reads_each_image_with_image_demonstrations(
    tmp_path, config, pictures, vlm_dir
):
    from icl_cl.backends.base import ImagePrompt
    from icl_cl.config import FusionConfig, LLMConfig, PromptConfig

    cfg = config.model_copy(
        update={
            "llm": LLMConfig(backend="transformers", model=str(vlm_dir), options={"batch_size": 4}),
            "prompt": PromptConfig(demonstrations="knn", n_demonstrations=2),
            "fusion": FusionConfig(heldout=10),
        }
    )
    clf = ContinualClassifier.open(tmp_path / "store", cfg)
    sessions = [_session(pictures, CLASSES[:5]), _session(pictures, CLASSES[5:])]
    for i, session in enumerate(sessions):  # fitted once, after the last session
        clf.learn(session, fit=i == len(sessions) - 1)
    learned = {ex.id: ex for session in sessions for ex in session}
    assert clf.backend().capabilities.images

    asked = [pictures[c][3] for c in CLASSES[:4]]
    vectors = clf.embedder.encode(asked)
    ranked = clf.memory.candidates(vectors, 3, clf.memory.resolve_scorer())
    batch = clf.reader().read(asked, vectors, [[lab for lab, _ in r] for r in ranked])
    for image, reading in zip(asked, batch.readings, strict=True):
        prompt = reading.prompt
        assert reading.fallback is None and prompt is not None
        assert isinstance(prompt.text, ImagePrompt)
        # Two stored pictures shown with their labels, then the picture asked about.
        assert len(prompt.demonstrations) == 2
        assert [img.key for img in prompt.text.images] == [
            *(learned[i].image.key for i in prompt.demonstrations),
            image.key,
        ]
        assert prompt.tokens > clf.backend().count_tokens(prompt.text.text)  # image tokens count
        assert np.isfinite(reading.scores).all() and len(reading.scores) == 3

    # Image tokens count against the budget: with room for one demonstration, the less similar
    # picture is dropped and the prompt says so.
    one_demo = batch.readings[0].prompt
    budget = one_demo.tokens - 1
    tight = clf.reader()
    tight.config = tight.config.model_copy(update={"max_prompt_tokens": budget})
    again = tight.read(asked[:1], vectors[:1], [[lab for lab, _ in ranked[0]]]).readings[0]
    assert again.prompt.demonstrations == one_demo.demonstrations[:1]
    assert (
        len(again.prompt.text.images) == 2 and "dropped 1 demonstrations" in again.prompt.shortened
    )
    assert again.prompt.tokens <= budget

    # The whole path: fusion weights fitted by learn on held-out pictures read by the model
    # (every label a candidate, so each held-out picture counts), then a decision for each.
    weights = clf.fit(10).fusion
    assert weights.heldout_items >= 10 and np.isfinite(weights.heldout_accuracy["llm"])
    preds = clf.predict(asked, k=10)
    assert all(p.labels[0] in [c.label for c in p.candidates] for p in preds)
    clf.close()
