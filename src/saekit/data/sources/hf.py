"""``data.source: hf``: a ``transformers`` model run on text while training.

Text: a hub dataset, a local dataset path or a text/JSONL file. Held out: the **leading
documents** (in dataset order, before shuffling) holding at least ``eval_tokens +
context_length`` tokens; ``saekit eval`` on the same dataset reads these same documents first. If
the whole dataset is shorter than that, a warning is issued and evaluation reuses training data.

Hooks: ``data.hooks`` (every hook harvested, in one forward pass stopped after the last), or
``data.hook`` (+ ``data.target_hook``: a transcoder's target, the 2-hook case), or
``data.input_hooks`` (+ ``data.target_hooks``: a crosscoder's sources, a cross-layer
transcoder's inputs and targets); the run trains on the selection of
saekit.data.hook_columns.selected_hooks, whose columns batches hold.

Model diffing: ``data.models`` runs several models on the same tokens, hooks named
``LABEL/HOOK`` (saekit.data.lm.model_set); held out: counted with the first model's tokenizer.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.data.buffer import ShuffleBuffer
from saekit.data.documents.reading import documents, leading_document_count, text_source
from saekit.data.hook_columns import hook_groups, join_hooks, selected_hooks
from saekit.data.lm.harvest import HarvestStats, harvest
from saekit.data.lm.harvester import HookPoint
from saekit.data.lm.model_set import check_models, describe_models, load_harvest, split_hook
from saekit.data.lm.models import MODEL_CLASSES, model_hidden_size
from saekit.data.lm.text import token_batches
from saekit.data.sources.config import SourceConfig
from saekit.data.sources.interface import StreamSettings
from saekit.data.sources.stream import (
    INIT_TOKENS,
    StreamSource,
    epoch_seed,
    full_batches,
    rebatch_up_to,
)

MODEL_DTYPES = ("float32", "bfloat16", "float16")


class HFSource(StreamSource):
    """Activations of a ``transformers`` model at its hook points, harvested while training.

    Per epoch: the training documents (all but the held-out leading ones) are shuffled (seeded
    with the epoch), split between ranks, tokenised and packed into contexts of
    ``context_length`` (BOS first, EOS between documents), run through the model
    ``model_batch_size`` contexts at a time (in a background thread when ``prefetch > 0``, so
    the forward overlaps SAE steps), filtered (padding, BOS unless ``keep_bos``) and mixed at
    token level in a :class:`ShuffleBuffer` before being cut into batches of ``batch_size``.
    """

    def __init__(
        self,
        data: HFSourceConfig,
        batch_size: int,
        seed: int,
        eval_tokens: int,
        device: str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        init_tokens: int = INIT_TOKENS,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.eval_tokens = eval_tokens
        self.rank = rank
        self.world_size = world_size
        self.init_tokens = init_tokens
        harvested = data.harvested_hooks()
        setup = load_harvest(  # data.models: each model run on the same tokens
            data.model,
            data.models,
            harvested,
            dtype=data.model_dtype,
            device=device,
            local_files_only=data.local_files_only,
            model_class=data.model_class,
            bos_token=data.bos_token,
            eos_token=data.eos_token,
            exclude_bos=not data.keep_bos,
        )
        self.setup = setup
        """The loaded model(s): a HarvestSetup, or with ``data.models`` a ModelSetSetup."""
        self.model = None if data.models else setup.model  # type: ignore[union-attr]
        self.tokenizer, self.bos_id = setup.tokenizer, setup.bos_id
        # every hook in one forward pass, stopped after the last; batches: the selected ones
        self.harvester = setup.harvester(*harvested[1:], dtype=torch.float32)
        self.hooks = data.selected_hooks()
        """The hooks the run trains on: batches are their columns, in this order."""
        self.d = sum(setup.width(hook) for hook in self.hooks)
        self.measured_width = self.d
        self.description = data.describe()
        self._n_eval_docs: int | None = None
        self.harvest_stats = HarvestStats()
        """Training tokens harvested and outliers dropped (``data.outlier_norm``) so far."""

    def _documents(self) -> Iterator[str]:
        data = self.data
        return documents(
            dataset=data.dataset,
            text_file=data.text_file,
            split=data.dataset_split,
            config_name=data.dataset_config,
            field=data.text_field,
            streaming=data.streaming,
        )

    @property
    def n_eval_docs(self) -> int:
        """Leading documents held out for evaluation (0 when the dataset is too short)."""
        if self._n_eval_docs is None:
            target = self.eval_tokens + self.data.context_length
            count, seen = leading_document_count(self._documents(), self.tokenizer, target)
            if seen < target:
                warnings.warn(
                    f"the dataset has only {seen} tokens, fewer than eval_tokens +"
                    f" context_length = {target}: nothing is held out, evaluation reuses"
                    " training data",
                    stacklevel=2,
                )
                count = 0
            self._n_eval_docs = count
        return self._n_eval_docs

    def _contexts(self, docs: Iterator[str], seed: int | None, rank: int, world: int):
        return token_batches(
            docs,
            self.tokenizer,
            context_length=self.data.context_length,
            batch_size=self.data.model_batch_size,
            bos_token=self.data.bos_token,
            eos_token=self.data.eos_token,
            seed=seed,
            rank=rank,
            world_size=world,
        )

    def _activations(self, contexts, stats: HarvestStats | None = None) -> Iterator[Tensor]:
        outputs = harvest(
            self.harvester,
            contexts,
            prefetch=self.data.prefetch,
            outlier_norm=self.data.outlier_norm,
            stats=stats,
        )
        for out in outputs:
            yield join_hooks(out, self.hooks).cpu()

    def _epoch(self, epoch: int) -> Iterator[Tensor]:
        docs = itertools.islice(self._documents(), self.n_eval_docs, None)
        s = epoch_seed(self.seed, epoch)
        contexts = self._contexts(docs, s, self.rank, self.world_size)
        capacity = max(self.data.shuffle_buffer_tokens, self.batch_size)
        buffer = ShuffleBuffer(capacity, self.batch_size, seed=s)
        activations = self._activations(contexts, self.harvest_stats)
        return full_batches(buffer.iterate(activations), self.batch_size)

    def _stream(self, start: int) -> Iterator[Tensor]:
        def endless() -> Iterator[Tensor]:
            for epoch in itertools.count():
                n = 0
                for batch in self._epoch(epoch):
                    n += 1
                    yield batch
                if n == 0:
                    raise ValueError(
                        f"the training documents of {self.data.dataset or self.data.text_file}"
                        f" (after {self.n_eval_docs} held out for evaluation) give fewer than"
                        f" batch_size = {self.batch_size} tokens"
                    )

        return itertools.islice(endless(), start, None)

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        docs = self._documents()
        if self.n_eval_docs:
            docs = itertools.islice(docs, self.n_eval_docs)
        contexts = self._contexts(docs, None, 0, 1)
        for x in rebatch_up_to(self._activations(contexts), batch_size, n_tokens):
            yield x, None


@dataclass
class HFSourceConfig(SourceConfig):
    """A ``transformers`` model run on text while training."""

    kind = "hf"
    shuffle_buffer_tokens: int = 262_144
    """Tokens held in the token-level shuffle buffer."""
    model: str | None = None
    """The model, a hub id or a local directory."""
    models: dict[str, str] | None = None
    """Model diffing (instead of ``model``): two or more models run on the same tokens, by
    label, e.g. {base: google/gemma-2-2b, chat: google/gemma-2-2b-it}; they must share a
    vocabulary. Hooks are then named LABEL/HOOK (base/model.layers.13), e.g. a crosscoder's
    ``input_hooks: [base/model.layers.13, chat/model.layers.13]``."""
    model_class: str = "auto"
    """How to load the model: causal-lm, masked-lm, encoder (the bare model, AutoModel) or auto
    (from its config; saekit/data/lm/models.py)."""
    hook: str | None = None
    """Hook point, e.g. transformer.h.8:input (residual stream before block 8); with
    ``hooks``: the one of them to train on."""
    target_hook: str | None = None
    """A transcoder's target, harvested in the same forward pass as ``hook``, e.g.
    model.layers.5.mlp (``hook`` model.layers.5.post_attention_layernorm); batches are then
    [input | target] and every SAE of the run is a transcoder (d_out: the target's width)."""
    hooks: list[str] | None = None
    """Hook points harvested in one forward pass, e.g. [model.layers.0.mlp:input,
    model.layers.0.mlp, model.layers.1.mlp]; ``hook`` (+ ``target_hook``) pick the ones to
    train on (needed from 3 hooks; saekit/data/hook_columns.py)."""
    input_hooks: list[str] | None = None
    """A dictionary over N hooks: a crosscoder's S sources, or a cross-layer transcoder's L
    inputs, layer by layer, e.g. [model.layers.0.mlp:input, model.layers.1.mlp:input]
    (harvested with the targets in one pass; with ``hooks``: picked from them)."""
    target_hooks: list[str] | None = None
    """A cross-layer transcoder's L targets, in the order of ``input_hooks``, e.g.
    [model.layers.0.mlp, model.layers.1.mlp]."""
    dataset: str | None = None
    """Documents from a Hugging Face dataset, a hub id or a local path (or use text_file)."""
    dataset_split: str = "train"
    """Split of the dataset."""
    dataset_config: str | None = None
    """Configuration name of the dataset."""
    text_file: str | None = None
    """Documents from a local file: .jsonl (one per line) or text (blank-line separated)."""
    text_field: str = "text"
    """Field holding the text in dataset records and .jsonl lines."""
    streaming: bool = True
    """Stream the dataset instead of downloading it whole."""
    context_length: int = 128
    """Tokens per context (BOS first, documents packed with EOS between them)."""
    model_batch_size: int = 32
    """Contexts per model forward."""
    model_dtype: str = "float32"
    """Dtype of the model weights: float32, bfloat16 or float16 (activations are float32)."""
    local_files_only: bool = False
    """Never download; load the model and tokenizer from the local cache or directory."""
    bos_token: str = "auto"
    """Token starting each context: auto (BOS, else EOS, else CLS), none, or a token."""
    eos_token: str = "auto"
    """Token after each document: auto (EOS, else BOS, else SEP), none, or a token."""
    keep_bos: bool = False
    """Train on BOS positions too (by default they are dropped, as are padding positions)."""
    prefetch: int = 2
    """Model batches harvested ahead in a background thread (0: no thread)."""
    outlier_norm: float | None = None
    """Drop tokens whose activation norm exceeds this multiple of the median norm of their
    model batch (massive-activation tokens; saekit/data/lm/harvest.py); None: keep them all."""

    def validate(self) -> None:
        if self.shuffle_buffer_tokens < 0:
            raise ValueError("data.shuffle_buffer_tokens must be >= 0")
        if self.context_length < 2:
            raise ValueError(f"data.context_length must be >= 2, got {self.context_length}")
        if self.model_batch_size < 1:
            raise ValueError("data.model_batch_size must be positive")
        if self.prefetch < 0:
            raise ValueError("data.prefetch must be >= 0")
        if self.outlier_norm is not None and not self.outlier_norm > 1:
            raise ValueError(
                f"data.outlier_norm must be > 1 (a multiple of the median), got {self.outlier_norm}"
            )
        if self.models is not None:
            if self.model:
                raise ValueError("set data.model (one model) or data.models (several), not both")
            check_models(self.models, "data.models")
        elif not self.model:
            raise ValueError("data.model (or data.models) is required when data.source is 'hf'")
        if not self.hook and not self.hooks and not self.input_hooks:
            raise ValueError(
                "data.hook (or data.hooks, or data.input_hooks) is required when data.source is "
                "'hf'"
            )
        if (self.dataset is None) == (self.text_file is None):
            raise ValueError("data: set exactly one of data.dataset and data.text_file")
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise ValueError(f"data.text_file: no such file {self.text_file!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(
                f"data.model_dtype must be float32, bfloat16 or float16, got {self.model_dtype!r}"
            )
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(
                f"data.model_class must be one of {MODEL_CLASSES}, got {self.model_class!r}"
            )
        for field in ("hook", "target_hook", "hooks", "input_hooks", "target_hooks"):
            value = getattr(self, field)  # LABEL/HOOK with data.models, HOOK without
            for name in [value] if isinstance(value, str) else value or []:
                split_hook(str(HookPoint.parse(name)), self.models, f"data.{field}")
        names = self.harvested_hooks()
        if len(set(names)) != len(names):
            raise ValueError(f"data.hooks names a hook twice: {names}")
        self.selected_hooks()

    def harvested_hooks(self) -> list[str]:
        """Every hook the forward pass yields, normalised (``NAME`` or ``NAME:input``)."""
        if self.hooks:
            return [str(HookPoint.parse(h)) for h in self.hooks]
        if self.input_hooks:  # each hook once, in the order named
            names = [*self.input_hooks, *(self.target_hooks or [])]
            return list(dict.fromkeys(str(HookPoint.parse(h)) for h in names))
        names = [self.hook] + ([self.target_hook] if self.target_hook is not None else [])
        return [str(HookPoint.parse(h)) for h in names]

    def selected_hooks(self) -> list[str]:
        """The hooks the run trains on: [input] or [input, target]."""
        if not self.hooks and self.input_hooks is None and self.target_hooks is None:
            return self.harvested_hooks()  # data.hook (+ data.target_hook): all of them
        return selected_hooks(
            self.harvested_hooks(),
            self.hook,
            self.target_hook,
            "data.hooks",
            self.input_hooks,
            self.target_hooks,
        )

    def model_name(self) -> str:
        """The model, or the model set as ``base=ID, chat=ID``."""
        return describe_models(self.models) if self.models else str(self.model)

    def describe(self) -> str:
        several = self.hooks or self.input_hooks
        names = self.harvested_hooks() if several else [str(HookPoint.parse(self.hook))]
        models = f"models {self.model_name()}" if self.models else f"model {self.model}"
        return f"hook{'s' * (len(names) > 1)} {', '.join(names)} of {models}"

    def has_target(self) -> bool:
        return bool(self.hook_groups()[1])

    def hook_groups(self) -> tuple[list[str], list[str]]:
        return hook_groups(self.selected_hooks(), self.input_hooks)

    def model_width(self) -> int:
        """The model's hidden size (its config's hidden_size / n_embd / d_model, read without
        loading weights): right for residual-stream and block-output hooks and an MLP's output;
        set d_in / d_out for other hooks (the source checks the real width before training).
        With ``models``: the first model's."""
        model = next(iter(self.models.values())) if self.models else self.model
        return model_hidden_size(model, self.local_files_only)

    def origin(self) -> dict[str, str]:
        inputs, targets = self.hook_groups()
        origin = {"model_name": self.model_name(), "hook": inputs[0]}
        if targets:
            origin["target_hook"] = targets[0]
        return origin

    def provenance(self, eval_tokens: int) -> dict[str, Any]:
        """The text source and the held-out rule (the leading ``eval_tokens + context_length``
        tokens), resolved with the tokenizer by saekit.data.documents.held_out."""
        text = text_source(
            self.dataset, self.text_file, self.dataset_split, self.dataset_config, self.text_field
        )
        leading = eval_tokens + self.context_length
        record = {"source": "hf", "text": text, "held_out_leading_tokens": leading}
        if self.models:  # which model each LABEL/HOOK names
            record["models"] = dict(self.models)
        return record

    def input_paths(self) -> list[tuple[str, str | None]]:
        models = [(f"data.models.{label}", m) for label, m in (self.models or {}).items()]
        return [
            ("data.text_file", self.text_file),
            ("data.model", self.model),
            *models,
            ("data.dataset", self.dataset),
        ]

    def context_size(self) -> int:
        return self.context_length

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> HFSource:
        return HFSource(
            self,
            run.batch_size,
            run.seed,
            run.eval_tokens,
            device=run.device,
            rank=rank,
            world_size=world_size,
        )
