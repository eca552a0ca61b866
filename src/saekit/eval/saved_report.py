"""The report of ``saekit eval`` on a saved SAE (:func:`saekit.eval.saved.evaluate_saved`): printed
by :func:`saekit.commands.evaluate.format_eval`, written by ``--json``.

The JSON is flat (the nested parts' keys sit beside the report's, in the order below) and each
optional part is written only when it applies; :meth:`SavedReport.from_json` reads a file written
by any version (a part whose keys are absent is None; other keys are not read).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from saekit.eval.metrics import ReconstructionMetrics
from saekit.eval.parts import PartsReport
from saekit.eval.splice import SpliceResult


@dataclass(frozen=True)
class SpliceScores:
    """The model's next-token CE and KL with the SAE spliced in (:mod:`saekit.eval.splice`): the
    parts of a :class:`SpliceResult` the report writes (its FVU is the report's own)."""

    ce_clean: float
    """CE (nats per predicted token) of the unmodified model."""
    ce_sae: float
    """CE with the activation replaced by the SAE's reconstruction."""
    ce_zero: float
    """CE with the activation zero-ablated."""
    ce_score: float
    """(ce_zero − ce_sae) / (ce_zero − ce_clean): 1 = perfect, 0 = as bad as zero-ablation."""
    kl_sae: float
    """Mean KL(p_clean ‖ p_sae) per predicted token."""
    kl_zero: float
    """Mean KL(p_clean ‖ p_zero) per predicted token."""
    kl_score: float
    """(kl_zero − kl_sae) / kl_zero."""
    n_spliced: int
    """Positions whose activation was replaced."""
    n_predicted_tokens: int
    """The spliced positions that predict a real next token (CE/KL average over these)."""

    @classmethod
    def of(cls, splice: SpliceResult) -> SpliceScores:
        d = {k: v for k, v in splice.to_dict().items() if k not in ("fvu", "n_tokens")}
        return cls(**d, n_predicted_tokens=splice.n_tokens)

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpliceScores:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CacheData:
    """``--cache`` alone: the cache's held-out shard."""

    cache: str
    """The activation cache's directory."""
    model: str | None
    """The model the cache was harvested from, as its manifest records it."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CacheData:
        return cls(d["cache"], d.get("model"))


@dataclass
class DocumentData:
    """``--model``: documents run through the model (which ones: :mod:`saekit.eval.saved`)."""

    model: str
    """The model's hub id or local directory (``--model``)."""
    model_class: str
    """How the model loaded: ``causal-lm`` (CE/KL spliced) or another kind (reconstruction only)."""
    text: dict[str, Any]
    """The text source the documents were read from (dataset or file, split, field)."""
    documents_from: str
    """Where the document selection comes from (a cache's or the SAE's held-out record, or the
    flag that named the documents)."""
    documents: int
    """Documents with at least one evaluated token."""
    document_ranges: list[list[int]]
    """Their indices in the text source, as [start, end) ranges."""
    target_hook: str | None = None
    """A transcoder: the hook its output is scored (and spliced) at; None for an SAE."""
    splice: SpliceScores | None = None
    """A causal LM: CE and KL with the SAE spliced in; None for other models."""
    training_documents_evaluated: int | None = None
    """How many evaluated documents the SAE trained on (a warning when any); None when its
    cfg.json records no training documents of the same text."""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "model_class": self.model_class,
            "text": self.text,
            "documents_from": self.documents_from,
        }
        if self.target_hook is not None:
            d["target_hook"] = self.target_hook
        if self.splice is not None:
            d.update(self.splice.to_json())
        d.update(documents=self.documents, document_ranges=self.document_ranges)
        if self.training_documents_evaluated is not None:
            d["training_documents_evaluated"] = self.training_documents_evaluated
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DocumentData:
        return cls(
            model=d["model"],
            model_class=d["model_class"],
            text=d["text"],
            documents_from=d["documents_from"],
            documents=d["documents"],
            document_ranges=d["document_ranges"],
            target_hook=d.get("target_hook"),
            splice=SpliceScores.from_json(d) if "ce_clean" in d else None,
            training_documents_evaluated=d.get("training_documents_evaluated"),
        )


@dataclass(frozen=True)
class SavedReport:
    """A saved SAE's evaluation by ``saekit eval``."""

    sae: str
    """The SAE's directory (``--sae``)."""
    hook: str
    """The hook point its input was read at."""
    data: CacheData | DocumentData
    """What it was evaluated on."""
    metrics: ReconstructionMetrics
    """Reconstruction (of a transcoder's target) and sparsity, ratios of sums over the tokens."""
    d_in: int
    """The SAE's input width."""
    d_sae: int
    """Its number of latents."""
    l0_histogram: list[int]
    """Entry j counts tokens with j active latents (the last bin also holds larger counts)."""
    parts: PartsReport | None = None
    """A cross-layer transcoder (per target layer) or a crosscoder (per source): scores per part
    and the decoder norms' summary; None for an SAE or a transcoder."""

    def to_json(self) -> dict[str, Any]:
        d = {
            "sae": self.sae,
            "hook": self.hook,
            **self.data.to_json(),
            **self.metrics.to_json(),
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "l0_histogram": self.l0_histogram,
        }
        if self.parts is not None:
            d.update(self.parts.to_json())
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SavedReport:
        data = DocumentData.from_json(d) if "model_class" in d else CacheData.from_json(d)
        metrics = ReconstructionMetrics.from_json(d)
        return cls(
            d["sae"],
            d["hook"],
            data,
            metrics,
            d["d_in"],
            d["d_sae"],
            d["l0_histogram"],
            PartsReport.from_json(d),
        )
