"""Start-up: the service listens at once, and ``/readyz`` says ready only once the models (the
embedder, and the index and heads of the state served) are loaded, so that the first predict
does not pay for loading them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.service.app import create_app
from tests.service_helpers import learned_store, running


def test_readyz_answers_ready_only_once_the_embedder_is_loaded(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:40], labels)
    fresh = load_embedder(EmbedderConfig())  # loads its model on first use
    assert "_model" not in vars(fresh)
    reasons = []
    with running(create_app(store, embedder=fresh)) as url:
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            answer = httpx.get(f"{url}/readyz", timeout=60)
            if answer.status_code == 200:
                break
            assert answer.status_code == 503
            reasons.append(answer.json()["reason"])
            time.sleep(0.05)
        assert answer.status_code == 200, reasons
        assert "_model" in vars(fresh), "ready before the embedder was loaded"
        body = {"inputs": [{"id": "a", "text": test[0].text}]}
        assert httpx.post(f"{url}/v1/predict", json=body, timeout=60).status_code == 200
    assert set(reasons) <= {"loading the models"}
