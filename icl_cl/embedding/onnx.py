"""The ONNX backend of the sentence embedder: the model exported once to ONNX (optionally with
dynamic int8 quantisation), cached on disk, and run with onnxruntime on the CPU.

The export is the sentence-transformers model's whole forward pass (transformer, pooling,
normalisation) traced with ``torch.onnx``; the int8 variant is quantised with onnxruntime's
``quantize_dynamic`` using the settings of sentence-transformers' dynamic-quantisation presets
(``export_dynamic_quantized_onnx_model``). That function itself needs ``optimum-onnx``, which
does not support transformers 5, so the same recipe is applied here directly.

Exports live in ``$ICL_CL_CACHE/onnx`` (default ``~/.cache/icl_cl/onnx``), one folder per model
and export settings. A folder is built under a temporary name and renamed into place, so a
reader sees a whole export or none; two processes exporting at once both finish, and one
folder wins.

Int8 vectors differ from the torch model's (cosine about 0.99), so the embedder's
:attr:`~OnnxSentenceEmbedder.name` names the backend and the quantisation, and a store built
with one never accepts another. Dynamic quantisation scales activations once per batch, so an
int8 vector also moves a little with the texts batched beside it (cosine about 0.98 or more).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder, resolve_model_path
from icl_cl.errors import ConfigError

logger = logging.getLogger(__name__)

# Bump when the export recipe or the folder layout changes: older exports are then rebuilt.
EXPORT_FORMAT = 1
MODEL_FILE = "model.onnx"
META_FILE = "export.json"
TOKENIZER_DIR = "tokenizer"

Variant = Literal["fp32", "qint8", "quint8"]

# sentence-transformers' dynamic int8 presets, by CPU, and the weight type each quantises to.
# All four are per-channel, with symmetric weights, asymmetric uint8 activations and the full
# 8-bit range; only AVX2 (no VNNI: its u8*s8 multiply-add saturates) keeps the weights unsigned.
# Presets with the same weight type give the same file, so stores name the weight type only.
INT8_WEIGHTS: dict[str, Variant] = {
    "avx512_vnni": "qint8",
    "avx512": "qint8",
    "arm64": "qint8",
    "avx2": "quint8",
}


def cache_root() -> Path:
    """Where ONNX exports are kept: ``$ICL_CL_CACHE/onnx``, by default ``~/.cache/icl_cl/onnx``."""
    return Path(os.environ.get("ICL_CL_CACHE", Path.home() / ".cache" / "icl_cl")) / "onnx"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no flags to read
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def int8_preset() -> str:
    """The sentence-transformers int8 preset that fits this CPU: ``arm64``, ``avx512_vnni``,
    ``avx512`` or ``avx2`` (the fallback when the CPU's flags cannot be read)."""
    if platform.machine().lower() in {"arm64", "aarch64"}:
        return "arm64"
    flags = _cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    return "avx2"


def onnx_variant(quantize: str) -> Variant:
    """The export variant a ``quantize`` setting means on this CPU."""
    if quantize == "none":
        return "fp32"
    if quantize == "int8":
        return INT8_WEIGHTS[int8_preset()]
    raise ConfigError(f"unknown quantize setting {quantize!r}; expected 'none' or 'int8'")


def _source_digest(source: str, variant: Variant) -> str:
    """Digest of what an export depends on: the model's files (path, size, modification time),
    the variant and the recipe's format, so a changed model is exported again."""
    folder = Path(source)
    files: dict[str, list[int]] = {}
    if folder.is_dir():
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                stat = file.stat()
                files[file.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    key = {"source": str(folder.resolve()) if folder.is_dir() else source, "files": files}
    key |= {"variant": variant, "format": EXPORT_FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def export_folder(model: str, variant: Variant) -> Path:
    """The cache folder of ``model``'s export in ``variant``: named after the model and the
    variant, plus a digest of the model's files and the recipe."""
    source = resolve_model_path(model)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return cache_root() / f"{slug or 'model'}-{variant}-{_source_digest(source, variant)}"


def ensure_export(model: str, variant: Variant) -> tuple[Path, bool]:
    """The folder of ``model``'s ONNX export in ``variant``, exported first if not cached.

    Offline: the model is read from its local folder (the packaged all-MiniLM-L6-v2 for the
    default name). An int8 variant is quantised from the fp32 export, which is cached too.

    Returns:
        The export folder, and whether this call built it.

    Raises:
        ConfigError: onnxruntime is not installed, or the model cannot be exported.
    """
    folder = export_folder(model, variant)
    if (folder / META_FILE).is_file():
        return folder, False
    source = resolve_model_path(model)
    if variant == "fp32":
        logger.info("exporting embedder %s to ONNX in %s (once)", model, folder)
        _publish(folder, lambda tmp: _export_fp32(model, source, tmp))
    else:
        fp32, _ = ensure_export(model, "fp32")
        logger.info("quantising the ONNX export of %s to %s in %s (once)", model, variant, folder)
        _publish(folder, lambda tmp: _quantize(fp32, tmp, variant))
    return folder, True


def _publish(folder: Path, build: Callable[[Path], None]) -> None:
    """Build an export in a temporary sibling folder, flush it, then rename it into place."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as exc:
        raise ConfigError(f"cannot write the ONNX export cache {folder.parent}: {exc}") from exc
    try:
        build(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META_FILE).is_file():
                raise
            logger.info("another process published %s first; using it", folder)
        fd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "embedder backend 'onnx' needs onnxruntime, onnx and onnxscript: "
            "pip install 'icl-cl[onnx]'"
        ) from exc


def _export_fp32(model: str, source: str, target: Path) -> None:
    """Export the whole sentence-transformers forward pass (inputs: the tokenizer's tensors;
    output: the sentence embedding) with dynamic batch and sequence axes."""
    _require_onnxruntime()
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(source, device="cpu")
    except Exception as exc:  # many failure types: missing files, hub offline, bad config
        raise ConfigError(f"cannot load embedder {model!r} ({source}) to export it: {exc}") from exc
    if list(getattr(st, "modalities", ["text"])) != ["text"]:
        raise ConfigError(f"embedder backend 'onnx' takes text-only models; {model!r} is not one")
    tokenizer = st.tokenizer
    names = list(tokenizer.model_input_names)
    features = st.preprocess(["a short text", "a somewhat longer text to pad the first one"])

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st
            self.eval()  # no dropout in the exported graph

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=st.max_seq_length)
    try:
        with warnings.catch_warnings():
            # All inputs share the two axes on purpose; the exporter says so once per input.
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            torch.onnx.export(
                SentenceEmbedding(),
                tuple(features[name] for name in names),
                str(target / MODEL_FILE),
                dynamo=True,
                input_names=names,
                output_names=["sentence_embedding"],
                # One entry: forward's *tensors, a tuple with one spec per tensor.
                dynamic_shapes=(({0: batch, 1: sequence},) * len(names),),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types
        raise ConfigError(f"cannot export embedder {model!r} to ONNX: {exc}") from exc
    tokenizer.save_pretrained(target / TOKENIZER_DIR)
    _write_meta(
        target,
        {
            "model": model,
            "variant": "fp32",
            "inputs": names,
            "dim": int(st.get_embedding_dimension()),
            "max_seq_length": int(st.max_seq_length),
            "torch": torch.__version__,
        },
    )


def _quantize(fp32: Path, target: Path, variant: Variant) -> None:
    """Dynamic int8 quantisation of an fp32 export (weights quantised once, activations per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[variant]
    quantize_dynamic(
        fp32 / MODEL_FILE,
        target / MODEL_FILE,
        per_channel=True,
        reduce_range=False,
        weight_type=weights,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    shutil.copytree(fp32 / TOKENIZER_DIR, target / TOKENIZER_DIR)
    meta = json.loads((fp32 / META_FILE).read_text(encoding="utf-8"))
    _write_meta(target, meta | {"variant": variant, "quantized_from": fp32.name})


def _write_meta(target: Path, meta: dict[str, Any]) -> None:
    import onnxruntime

    meta = {"format": EXPORT_FORMAT, **meta, "onnxruntime": onnxruntime.__version__}
    (target / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


class OnnxSession:
    """One cached export, loaded: its tokenizer, called as sentence-transformers calls it, and an
    onnxruntime CPU session."""

    def __init__(self, folder: Path) -> None:
        _require_onnxruntime()
        import onnxruntime as ort
        from transformers import AutoTokenizer

        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        self.dim = int(meta["dim"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.inputs: list[str] = list(meta["inputs"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
        self.session = ort.InferenceSession(
            str(folder / MODEL_FILE), providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """Unit vectors (float32) of ``texts``, ``batch_size`` texts per run."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            features = self.tokenizer(
                batch,
                padding=True,
                truncation="longest_first",
                max_length=self.max_seq_length,
                return_tensors="np",
            )
            feeds = {name: np.asarray(features[name], dtype=np.int64) for name in self.inputs}
            out[start : start + len(batch)] = self.session.run(None, feeds)[0]
        # The export normalises when the model does; the contract wants unit rows regardless.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


class OnnxSentenceEmbedder(SentenceTransformerEmbedder):
    """A sentence-transformers text model run from its cached ONNX export; loads lazily, exporting
    on first use if needed.

    Args:
        model: A sentence-transformers model name or a local directory (the default name is the
            packaged all-MiniLM-L6-v2).
        batch_size: Texts per onnxruntime run.
        quantize: ``"none"`` (fp32) or ``"int8"`` (dynamic int8, with the preset for this CPU).
    """

    def __init__(self, model: str, batch_size: int = 64, quantize: str = "none") -> None:
        super().__init__(model, device="cpu", batch_size=batch_size, pack=False)
        self.variant = onnx_variant(quantize)

    @property
    def name(self) -> str:
        """The model, the backend and the quantisation: ``"<model> [onnx]"`` or
        ``"<model> [onnx qint8]"`` (``quint8`` on an AVX2-only CPU)."""
        suffix = "" if self.variant == "fp32" else f" {self.variant}"
        return f"{self._name} [onnx{suffix}]"

    def _load(self) -> OnnxSession:
        folder, _ = ensure_export(self._name, self.variant)
        return OnnxSession(folder)

    @cached_property
    def dim(self) -> int:
        return self._model.dim

    def _encode_chunk(self, inputs: list[Any]) -> np.ndarray:
        return self._model.encode(inputs, self._batch_size)
