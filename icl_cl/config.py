"""Explicit configuration objects (pydantic). Passed in, never global."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icl_cl.errors import ConfigError

# Every option list is defined once, here: a Literal (what pydantic validates and modules type
# with) and, where code lists the options, the tuple of its values.
ScorerName = Literal["ncm", "mahalanobis", "knn", "ridge", "ranpac", "klda", "description"]
SCORERS: tuple[str, ...] = get_args(ScorerName)
DemoStrategy = Literal["none", "knn", "per_label", "mmr", "random"]
LabelPresentation = Literal["names", "descriptions", "summaries"]
InContextMethod = Literal["none", "contextual", "domain", "batch"]
IN_CONTEXT_METHODS: tuple[str, ...] = get_args(InContextMethod)
ProbabilityMethod = Literal["auto", "temperature", "platt", "none"]
PROBABILITY_METHODS: tuple[str, ...] = get_args(ProbabilityMethod)
LabelSetRuleName = Literal["cardinality", "threshold", "label_thresholds"]
LABEL_SET_RULES: tuple[str, ...] = get_args(LabelSetRuleName)
CONTENT_FREE: tuple[str, ...] = ("N/A", "", "[MASK]")
# What "auto" resolves to before the fit step has chosen on held-out stored examples: the scorer
# that measured best on the development corpora
# (single-label: WordNet supersenses, Debian sections; multi-label: debtags). See docs/results.md.
AUTO_SCORER = {False: "klda", True: "knn"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LLMViewConfig(_Strict):
    """Hidden states of a causal LM as an embedding view (defaults chosen in eval/bench/llm_view.py)."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers in this process, or vLLM's pooling runner (GPU)"
    )
    model: str = Field(
        "smollm2-135m-instruct", description="packaged model name, HF id or local path"
    )
    layer: int = Field(
        16, description="layer pooled (1-based); negative counts from the end (-1: the last)"
    )
    pooling: Literal["mean", "last"] = "mean"
    max_tokens: int = Field(256, gt=0, description="a text's own tokens beyond this are cut")
    template: str = Field(
        "none", description="'none', 'chat' (the model's chat template) or a prompt with {text}"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="transformers: bfloat16 is about twice as fast on AVX-512 BF16 CPUs"
    )
    batch_size: int = Field(32, gt=0)
    combine: Literal["alone", "concat"] = Field(
        "concat", description="the view alone, or after the sentence embedder's vector"
    )
    centre: bool = Field(
        True,
        description="subtract the mean of the first session's vectors (frozen, kept in the "
        "store), each block renormalised: LLM hidden states share a large common direction",
    )


class EmbedderConfig(_Strict):
    """Which sentence encoder embeds examples, labels and queries."""

    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="sentence-transformers model name or local path; the default ships in a package",
    )
    device: str = "cpu"
    batch_size: int = Field(64, gt=0)
    pack: bool = Field(
        True,
        description="pack several texts into one attention row (BERT-family models): a forward "
        "pass costs its real tokens, not padding; the vectors are the same",
    )
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="'onnx': run an ONNX export of the model with onnxruntime on the CPU "
        "(exported once, cached; needs the [onnx] extra)",
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="'int8': dynamic int8 quantisation of the ONNX export (backend 'onnx')"
    )
    llm_view: LLMViewConfig | None = Field(
        None, description="also (or only) embed with an LLM's hidden states"
    )

    @model_validator(mode="after")
    def _onnx_settings_agree(self) -> EmbedderConfig:
        if self.quantize != "none" and self.backend != "onnx":
            raise ValueError(f"quantize={self.quantize!r} needs backend 'onnx'")
        if self.backend == "onnx" and self.device != "cpu":
            raise ValueError("backend 'onnx' runs on the CPU (onnxruntime); set device 'cpu'")
        return self


class MemoryConfig(_Strict):
    """The external continual learner: which scorer ranks labels, and its hyper-parameters."""

    scorer: ScorerName | Literal["auto"] = Field(
        "auto",
        description="'auto': what the fit step chose on held-out stored examples (the best "
        "scorer, fused with others that earn a weight); before any fit, klda for single-label "
        "stores and knn for multi-label",
    )
    ridge_lambda: float = Field(
        1.0, gt=0, description="ridge regularisation (ACIL's gamma) on L2-normalised embeddings"
    )
    shrinkage: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto",
        description="Mahalanobis covariance shrinkage in [0, 1] towards a scaled identity; "
        "'auto' estimates it from the data (Oracle Approximating Shrinkage)",
    )
    knn_neighbors: int = Field(20, gt=0, description="neighbours that vote in the kNN scorer")
    teen_max_examples: int = Field(
        10,
        ge=0,
        description="prototype calibration (TEEN) of the mean-based scorers (ncm, mahalanobis, "
        "klda): a label with at most this many examples has its class mean pulled towards the "
        "means of similar labels with more (0: off)",
    )
    # Defaults: the best mean harmonic mean of base and few-shot accuracy over ncm, mahalanobis
    # and klda, 5-shot sessions simulated inside the train splits of WordNet supersenses and
    # Debian sections (eval/bench/fewshot_calibration.py; docs/results.md, "Few-shot labels").
    teen_alpha: float = Field(
        0.25, ge=0, le=1, description="TEEN: weight a few-shot label keeps on its own class mean"
    )
    teen_tau: float = Field(
        4.0,
        gt=0,
        description="TEEN: softmax temperature over the cosines to the populated labels' means",
    )
    description_prior: float = Field(
        1.0,
        ge=0,
        description="the ncm scorer's class mean of a label with a description counts its "
        "embedded text as this many examples: a label with few examples leans on its text, one "
        "with none is its text (0: off)",
    )
    ranpac_features: int = Field(
        4096,
        ge=256,
        description="the most random ReLU features of the ranpac scorer (RanPAC): the widest "
        "map is the smallest power of two >= the stored examples, from 256 up to this, and the "
        "fit keeps the narrowest of it and its two halvings that scores as well on held-out "
        "items (state: an M x M inverse Gram, 64 MiB at 4,096; a session costs O(n M^2))",
    )
    ranpac_lambda: float = Field(
        1e-3,
        gt=0,
        description="ranpac's ridge strength relative to the mean eigenvalue of its Gram matrix "
        "(the fit step chooses it on held-out stored examples)",
    )
    klda_features: int = Field(
        4096,
        ge=256,
        description="the most random Fourier features of the kernel LDA scorer (klda); sized "
        "like ranpac's",
    )
    klda_bandwidth: float = Field(
        1.0, gt=0, description="Gaussian kernel width of klda's random Fourier features"
    )
    auto_heldout: int = Field(
        1000,
        ge=10,
        description="stored examples held out by the fit step to choose what 'auto' stands for "
        "(the best scorer, fused with others that earn a weight) and ranpac's strength; a "
        "larger store holds out a twentieth of its examples, up to 5,000",
    )
    feature_seed: int = Field(0, description="seed of the random feature maps (fixed per store)")
    exact_search_max: int = Field(
        200_000,
        gt=0,
        description="stored examples up to which the example index is exact (flat); above it, "
        "HNSW, saved beside the store (about 1.8 KB an example)",
    )
    label_exact_search_max: int = Field(
        20_000,
        gt=0,
        description="labels up to which label retrieval (Infer-Retrieve-Rank) is exact (flat); "
        "above it, HNSW",
    )


class LLMConfig(_Strict):
    """Which LLM reads the candidates, through which backend."""

    backend: str = Field(
        "transformers", description="registered backend: transformers, vllm, openai"
    )
    model: str = Field(
        "smollm2-135m-instruct", description="packaged model name, HF id, path or served name"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="backend keyword arguments")
    cache: bool = Field(True, description="persistent call cache (SQLite) in the store")


class PromptConfig(_Strict):
    """Prompt strategy: template, demonstrations, label presentation, scoring normalisation."""

    template: str = Field(
        "auto", description="template name in prompts/ or a .j2 path; auto by store kind"
    )
    demonstrations: DemoStrategy = "knn"
    n_demonstrations: int = Field(4, ge=0)
    label_presentation: LabelPresentation = "descriptions"
    length_normalization: Literal["sum", "mean"] = Field(
        "mean",
        description="summed option log-probabilities favour short labels, means favour long ones",
    )
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="default: the model's context window"
    )


class FusionConfig(_Strict):
    """How ECL and LLM scores are combined; the weights are fitted on held-out stored examples."""

    heldout: int = Field(
        200, ge=10, description="stored examples held out to fit the fusion weights"
    )
    seed: int = 0


class CalibrationConfig(_Strict):
    """How LLM option scores are de-biased, and how decision scores become probabilities."""

    in_context: InContextMethod = Field(
        "none",
        description="de-bias LLM option scores: contextual (content-free inputs), domain "
        "(random in-domain words), batch (the inputs of the predict call)",
    )
    content_free: tuple[str, ...] = Field(
        CONTENT_FREE, min_length=1, description="content-free inputs (contextual)"
    )
    domain_samples: int = Field(
        3, gt=0, description="random in-domain word strings per input (domain)"
    )
    probability: ProbabilityMethod = Field(
        "auto",
        description="scores to probabilities: auto = temperature (single-label) or platt "
        "(multi-label); none = softmax/sigmoid of the raw scores",
    )
    heldout: int = Field(
        3000,
        ge=10,
        description="held-out stored examples for fitting probabilities and conformal sets of "
        "ECL decisions",
    )
    heldout_llm: int = Field(
        500,
        ge=10,
        description="held-out stored examples read by the LLM to fit probabilities and "
        "conformal sets when the LLM has fusion weight (at least fusion.heldout; the fusion's "
        "own reads are cached and reused)",
    )


class DecisionConfig(_Strict):
    """How a multi-label store chooses a prediction's label set from its candidates' calibrated
    probabilities (single-label stores always choose the top one). Every rule chooses at least
    the most probable candidate unless the prediction abstains."""

    rule: LabelSetRuleName = Field(
        "cardinality",
        description="cardinality: the top n, n the label count of the nearest stored examples; "
        "threshold: every candidate whose probability is >= threshold; label_thresholds: a "
        "threshold per label, the one maximising the label's F1 on held-out stored examples, "
        "shrunk (for labels with few held-out positives) towards a global threshold that is "
        "itself fitted on them, maximising micro-F1 over all held-out (item, candidate) pairs",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="the threshold rule's probability threshold (label_thresholds fits its own "
        "and falls back to this only when no held-out candidate is gold)",
    )


class IRRConfig(_Strict):
    """Infer-Retrieve-Rank (D'Oosterlinck et al. 2024): candidates come from retrieving labels
    by name and description instead of (or fused with) the ECL. ``k`` of predict is the number
    of retrieved labels the rank step reads (the paper's rank_topk)."""

    infer: bool = Field(True, description="the LLM writes label-like queries for the input")
    retrieve: bool = Field(
        True,
        description="retrieve labels from the label index with the input and its queries; "
        "off: the ECL supplies the candidates (queried with the input moved towards its queries)",
    )
    ecl: bool = Field(
        False, description="fuse the ECL's ranking into retrieval (reciprocal-rank fusion)"
    )
    rank: bool = Field(True, description="the LLM reads the retrieved labels and scores each one")
    prior: float = Field(
        0.0,
        ge=0,
        description="label-prior reweighting A: score * log(A * frequency + e); 0 = off",
    )
    max_queries: int = Field(8, gt=0, description="queries kept from the infer step")
    max_query_tokens: int = Field(48, gt=0, description="tokens the infer step may generate")
    n_demonstrations: int = Field(
        3, ge=0, description="nearest stored examples (with their labels) shown to the infer step"
    )


# What a reopened store takes from the config it is opened with: all but the embedder and the
# label mode, which the stored examples depend on.
QUERY_TIME_FIELDS = (
    "memory",
    "llm",
    "prompt",
    "fusion",
    "calibration",
    "decision",
    "irr",
    "max_text_chars",
)


class ClassifierConfig(_Strict):
    """Everything a store is created with. Saved in the store and reused when it is reopened."""

    embedder: EmbedderConfig = EmbedderConfig()
    memory: MemoryConfig = MemoryConfig()
    llm: LLMConfig | None = Field(None, description="None: the ECL decides alone")
    prompt: PromptConfig = PromptConfig()
    fusion: FusionConfig = FusionConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    decision: DecisionConfig = DecisionConfig()
    irr: IRRConfig | None = Field(
        None, description="Infer-Retrieve-Rank settings; None: InCA-style (ECL candidates)"
    )
    multi_label: bool | None = Field(
        None, description="None: detect from training data (any example with != 1 label)"
    )
    max_text_chars: int = Field(100_000, gt=0, description="longer inputs are rejected, not cut")

    @model_validator(mode="after")
    def _irr_steps_have_an_llm(self) -> ClassifierConfig:
        if self.irr is not None and (self.irr.infer or self.irr.rank) and self.llm is None:
            raise ValueError(
                "Infer-Retrieve-Rank's infer and rank steps need an LLM: set 'llm', "
                "or switch them off (irr: {infer: false, rank: false})"
            )
        return self

    def with_query_settings(self, other: ClassifierConfig) -> ClassifierConfig:
        """This (stored) config with the query-time settings of ``other``."""
        return self.model_copy(update={field: getattr(other, field) for field in QUERY_TIME_FIELDS})

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClassifierConfig:
        """Load a config from a YAML file, with a clear error naming the file."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ClassifierConfig:
        """Validate a plain dict, turning pydantic errors into :class:`ConfigError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: invalid config: {exc}") from exc
