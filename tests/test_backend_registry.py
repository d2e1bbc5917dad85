"""The backend registry (names to ``"module:Class"``, imported on demand) and the one tokenizer
loader the backends share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from icl_cl.backends.hf_loading import load_tokenizer
from icl_cl.backends.registry import BACKENDS, available_backends, backend_class, create_backend
from icl_cl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> list[str]:
    """The ``icl_cl`` modules a fresh interpreter has imported after running ``code``."""
    listing = "print(json.dumps(sorted(m for m in sys.modules if m.startswith('icl_cl'))))"
    probe = f"{code}\nimport json, sys\n{listing}"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_naming_backends_imports_none_of_them() -> None:
    loaded = _modules_after(
        "from icl_cl.backends.registry import available_backends\navailable_backends()"
    )
    assert not [m for m in loaded if m.startswith(("icl_cl.backends.openai", "icl_cl.backends.t"))]
    assert "icl_cl.backends.vllm" not in loaded


def test_creating_one_backend_imports_only_it() -> None:
    loaded = _modules_after(
        "from icl_cl.backends.registry import create_backend\n"
        "create_backend('openai', model='m', base_url='http://127.0.0.1:9/v1').close()"
    )
    assert "icl_cl.backends.openai.backend" in loaded
    assert "icl_cl.backends.transformers" not in loaded and "icl_cl.backends.vllm" not in loaded


def test_every_name_resolves_to_a_backend_class_of_that_name() -> None:
    assert available_backends() == sorted(BACKENDS) == ["openai", "transformers", "vllm"]
    for name in available_backends():
        if name == "transformers":
            pytest.importorskip("transformers")
        assert backend_class(name).name == name


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="openai, transformers, vllm"):
        create_backend("tgi", model="m")


def test_one_tokenizer_loader_for_packaged_models_and_gguf_files() -> None:
    pytest.importorskip("transformers")
    from icl_cl.backends.packaged import packaged_gguf

    try:
        directory, file = packaged_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    by_name = load_tokenizer("smollm2-135m-instruct")
    by_file = load_tokenizer(directory, file)
    text = "Which category fits: a cat"
    assert by_name(text)["input_ids"] == by_file(text)["input_ids"]
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_tokenizer(ROOT / "no-such-model")
