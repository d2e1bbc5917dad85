"""vLLM's parallel options: checked and passed to ``vllm.LLM`` as given (no GPU needed: the
engine is a stand-in that records its arguments); the end-to-end run is behind ``gpu``."""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from icl_cl.backends.vllm import VLLMBackend
from icl_cl.backends.vllm_requests import engine_args
from icl_cl.config import ClassifierConfig
from icl_cl.errors import ConfigError
from tests.test_backend_vllm import StandInLLM, tokenizer  # noqa: F401  (a fixture)

CONFIG = Path(__file__).resolve().parents[1] / "eval" / "configs" / "classifier"


def test_engine_args_pass_the_parallel_sizes() -> None:
    args = engine_args(
        "m",
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        data_parallel_size=3,
        distributed_executor_backend="ray",
        dtype="bfloat16",
    )
    assert args == {
        "model": "m",
        "dtype": "bfloat16",
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "data_parallel_size": 3,
        "distributed_executor_backend": "ray",
    }


def test_engine_args_leave_vllm_defaults_out() -> None:
    assert engine_args("m", seed=0) == {"model": "m", "seed": 0, "tensor_parallel_size": 1}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("tensor_parallel_size", 0),
        ("pipeline_parallel_size", -1),
        ("data_parallel_size", 1.5),
        ("pipeline_parallel_size", True),
        ("distributed_executor_backend", "slurm"),
    ],
)
def test_engine_args_refuse_bad_values(option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        engine_args("m", **{option: value})


def test_the_backend_starts_vllm_with_the_options_of_the_worked_example(
    stand_in_vllm: types.ModuleType,
    tokenizer: Any,  # noqa: F811
) -> None:
    config = ClassifierConfig.from_dict(yaml.safe_load((CONFIG / "vllm-parallel.yaml").read_text()))
    assert config.llm is not None
    started: list[dict[str, Any]] = []

    def llm(**kwargs: Any) -> StandInLLM:
        started.append(kwargs)
        return StandInLLM(tokenizer)

    stand_in_vllm.LLM = llm  # type: ignore[attr-defined]
    backend = VLLMBackend(model=config.llm.model, **config.llm.options)
    backend.close()
    (kwargs,) = started
    assert kwargs["model"] == "Qwen/Qwen2.5-72B-Instruct"
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["pipeline_parallel_size"] == 2
    assert "data_parallel_size" not in kwargs  # 1 is vLLM's default
    assert kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["dtype"] == "bfloat16" and kwargs["gpu_memory_utilization"] == 0.9


@pytest.mark.gpu
def test_a_tensor_parallel_engine_scores_options() -> None:
    """Needs vLLM, 2 CUDA GPUs and ICL_CL_VLLM_MODEL (a small local model directory)."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    model = os.environ.get("ICL_CL_VLLM_MODEL")
    if not model:
        pytest.skip("set ICL_CL_VLLM_MODEL to a small local model")
    backend = VLLMBackend(
        model=model,
        max_model_len=1024,
        gpu_memory_utilization=0.4,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    try:
        scores = backend.score(["The capital of France is"], [[" Paris", " London"]])
        assert scores.logprobs[0, 0] > scores.logprobs[0, 1]
    finally:
        backend.close()
