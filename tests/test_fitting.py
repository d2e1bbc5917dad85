"""Fitting is a step: learn ends with it (or skips it), `fit` runs it alone, predict only reads
the store (byte for byte), says when the fit is stale and fits in memory when there is none."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from icl_cl import ClassifierConfig, ContinualClassifier, FallbackReason
from icl_cl.cli import main
from icl_cl.config import FusionConfig, LLMConfig, PromptConfig
from icl_cl.describe import PredictionRow
from tests.tiny_models import tiny_backend

SAMPLE = Path(__file__).resolve().parents[1] / "eval" / "data" / "wordnet-sample"
WORDS = "noun verb adj . animal plant food artifact person motion communication all".split()


def _files(store: Path) -> dict[str, bytes]:
    """Every file of the store, with its bytes."""
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def weak_llm():
    return tiny_backend(seed=3, words=WORDS, context=512)


def _llm_config(heldout: int = 20) -> ClassifierConfig:
    return ClassifierConfig(
        llm=LLMConfig(backend="transformers", model="tiny-random"),
        prompt=PromptConfig(n_demonstrations=1),
        fusion=FusionConfig(heldout=heldout),
    )


def test_learn_fits_and_predict_changes_no_byte_of_the_store(tmp_path, embedder, wordnet, weak_llm):
    train, test, labels = wordnet
    stages: list[str] = []
    store = tmp_path / "s"
    with ContinualClassifier.open(store, _llm_config(), embedder=embedder, backend=weak_llm) as clf:
        report = clf.learn(
            train, labels, k=4, progress=lambda stage, done, total: stages.append(stage)
        )
        assert report.fit_seconds > 0
    # The fusion's 20 held-out items: ranked by the ECL, then read by the LLM.
    assert "fitting: 20 held-out items (ECL)" in stages
    assert "fitting: 20 LLM reads of held-out items" in stages
    before = _files(store)
    texts = [ex.text for ex in test[:6]]
    with ContinualClassifier.open(store, _llm_config(), embedder=embedder, backend=weak_llm) as clf:
        stages.clear()
        fitted = clf.predict(texts, k=4, progress=lambda stage, done, total: stages.append(stage))
        assert not any(s.startswith("fitting") for s in stages)  # the stored fit is used
        unfitted = clf.predict(texts, k=3)  # no fit for k=3: one is made in memory only
        alone = clf.predict(texts, k=4, use_llm=False)
    assert _files(store) == before
    assert all(not p.evidence.stale_fit for p in fitted + unfitted + alone)
    assert all(p.cost is not None for p in fitted + unfitted) and all(p.cost is None for p in alone)


def test_a_fit_made_before_the_store_grew_is_used_and_said_to_be_stale(
    tmp_path, embedder, wordnet, caplog
):
    train, test, labels = wordnet
    half = len(train) // 2
    store = tmp_path / "s"
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.learn(train[:half], labels)
        clf.learn(train[half:], fit=False)
        assert (
            clf.info()["heads"][0]["stale"] and clf.info()["heads"][0]["fitted_at_examples"] == half
        )
    before = _files(store)
    with (
        caplog.at_level(logging.WARNING),
        ContinualClassifier.open(store, embedder=embedder) as clf,
    ):
        preds = clf.predict([ex.text for ex in test[:4]])
    assert all(p.evidence.stale_fit for p in preds)
    assert "icl-cl fit refits them" in caplog.text
    assert _files(store) == before
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING),
        ContinualClassifier.open(store, embedder=embedder) as clf,
    ):
        clf.predict([ex.text for ex in test[:4]], k=3)
        assert "fitting them in memory, not saved" in caplog.text
        heads = clf.fit()
        assert heads.n_examples == len(train) and not clf.info()["heads"][0]["stale"]
        assert not any(p.evidence.stale_fit for p in clf.predict([ex.text for ex in test[:4]]))


def test_cli_learn_no_fit_fit_and_info(tmp_path, capsys):
    store = str(tmp_path / "store")
    data = str(SAMPLE / "train.jsonl")
    # -q and -v are accepted after the command too.
    assert main(["learn", "--store", store, "--data", data, "--no-fit", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["fit_seconds"] == 0
    assert main(["info", "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["heads"] == []
    assert main(["fit", "--store", store, "--k", "3", "-q", "-v"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["spec"] == "k=3, scorer=mahalanobis, ECL" and not fitted["stale"]
    assert fitted["calibration_heldout_items"] == 240 and fitted["calibration_default"] is None
    assert main(["info", "--store", store]) == 0
    (heads,) = json.loads(capsys.readouterr().out)["heads"]
    assert heads["fitted_at_examples"] == 240 and heads["llm_earned_weight"] is None
    before = _files(Path(store))
    out = tmp_path / "pred.jsonl"
    predict = ["predict", "--store", store, "--input", str(SAMPLE / "test.jsonl")]
    assert main([*predict, "--output", str(out), "--k", "3", "-q"]) == 0
    assert main([*predict, "--output", str(out), "--k", "5", "-q"]) == 0  # fitted in memory
    assert _files(Path(store)) == before
    assert main(["fit", "--store", str(tmp_path / "none"), "-q"]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no store here" in err


def test_cli_predict_with_a_dead_llm_writes_nothing_and_says_why(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "llm: {backend: openai, model: none, options: {base_url: 'http://127.0.0.1:9/v1', "
        "timeout: 0.5, max_retries: 0, scoring: first_token}}\nfusion: {heldout: 10}\n"
    )
    store = tmp_path / "store"
    learn = ["learn", "--store", str(store), "--data", str(SAMPLE / "train.jsonl")]
    assert main([*learn, "--config", str(config), "-q"]) == 0  # the session is stored anyway
    before = _files(store)
    out = tmp_path / "pred.jsonl"
    predict = ["predict", "--store", str(store), "--input", str(SAMPLE / "test.jsonl")]
    assert main([*predict, "--output", str(out), "--k", "3", "-q"]) == 0
    assert _files(store) == before
    # The line reads back as the typed row: the fallback's reason, and the error as its detail.
    row = PredictionRow.model_validate_json(out.read_text().splitlines()[0])
    assert row.llm is not None and row.llm.fallback is not None
    assert row.llm.fallback.reason is FallbackReason.BACKEND_ERROR and row.llm.fallback.detail
