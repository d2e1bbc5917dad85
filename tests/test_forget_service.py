"""POST /v1/forget and /v1/relabel: writes with the write scope, idempotent with an
Idempotency-Key, served as a learn (the edited state is served once acknowledged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from icl_cl.memory.verify import verify_store
from icl_cl.service.app import create_app
from icl_cl.service.auth import KeySet
from icl_cl.service.settings import ServiceSettings
from tests.service_helpers import learned_store, running, wait_ready

READ, WRITE = "read-key-0123456789", "write-key-9876543210"


def _post(url: str, path: str, body: Any, key: str, **headers: str) -> httpx.Response:
    headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def test_forget_and_relabel_over_http(tmp_path: Path, embedder: Any, wordnet: Any) -> None:
    train, test, labels = wordnet
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{READ} read\n{WRITE} write\n", encoding="utf-8")
    store = learned_store(tmp_path / "store", embedder, train[:120], labels)
    app = create_app(store, settings=ServiceSettings(), keys=KeySet.load(keys), embedder=embedder)
    gone = {"ids": [ex.id for ex in train[:6]]}
    with running(app) as url:
        wait_ready(url, {"Authorization": f"Bearer {READ}"})
        assert _post(url, "/v1/forget", gone, READ).status_code == 403
        first = _post(url, "/v1/forget", gone, WRITE, **{"Idempotency-Key": "f-1"})
        assert first.status_code == 200, first.text
        assert first.json() == {
            "session": 2, "kind": "forget", "examples_forgotten": 6, "examples_relabelled": 0,
            "labels_removed": 0, "labels_added": 0,
        }  # fmt: skip
        again = _post(url, "/v1/forget", gone, WRITE, **{"Idempotency-Key": "f-1"})
        assert again.json() == first.json()  # not forgotten twice (the ids are gone already)
        reused = _post(
            url, "/v1/forget", {"ids": [train[7].id]}, WRITE, **{"Idempotency-Key": "f-1"}
        )
        assert reused.status_code == 422
        # The store's content refuses it (409, as a learn that contradicts the store); the
        # schema refuses an empty forget and an id given twice (422).
        unknown = _post(url, "/v1/forget", {"ids": ["no-such-id"]}, WRITE)
        assert unknown.status_code == 409 and "not stored examples" in unknown.text
        assert _post(url, "/v1/forget", {}, WRITE).status_code == 422
        twice = _post(url, "/v1/forget", {"ids": [train[7].id, train[7].id]}, WRITE)
        assert twice.status_code == 422 and "given twice" in twice.text
        info = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {READ}"}).json()
        assert (info["examples"], info["serving_session"]) == (114, 2)
        fix = {
            "examples": [{"id": train[10].id, "labels": ["noun.new"]}],
            "labels": [{"label": "noun.new", "description": "a label made by a relabel"}],
        }
        missing = _post(url, "/v1/relabel", {"examples": fix["examples"]}, WRITE)
        assert missing.status_code == 409 and "no definition" in missing.text
        relabelled = _post(url, "/v1/relabel", fix, WRITE, **{"Idempotency-Key": "r-1"})
        assert relabelled.status_code == 200, relabelled.text
        assert relabelled.json()["examples_relabelled"] == 1
        assert relabelled.json()["labels_added"] == 1
        body = {"inputs": [{"id": "q", "text": test[0].text}]}
        predicted = _post(url, "/v1/predict", body, READ)
        assert predicted.status_code == 200
    assert verify_store(store).ok
