"""Which transformers class a model loads as, loading it, and checking a hook before loading.

Model kinds (``--model-class``, ``data.model_class``):

- ``causal-lm``: ``AutoModelForCausalLM`` (GPT-2, Llama, ...); the only kind with next-token
  CE/KL evaluation;
- ``masked-lm``: ``AutoModelForMaskedLM`` (BERT, RoBERTa, ... with their MLM head);
- ``encoder``: ``AutoModel``, the bare model without a head (BERT's encoder, any base model);
- ``auto`` (default): from the config alone, see :func:`model_kind`.

Why not always ``AutoModelForCausalLM``: BERT's config maps to ``BertLMHeadModel``, which
loads a BERT checkpoint with a freshly initialised LM head (transformers warns that the
checkpoint "seem[s] corrupted") and treats the encoder as a decoder.

A hook name is checked on a model built on the meta device (shapes, no storage, nothing
initialised) before the weights load, so a wrong name fails in about a second rather than after
the 15-21 s a 135M-parameter model takes to load on a CPU (issue 18).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from saekit.data.lm.harvester import (
    AUTO_CLASSES,
    Harvester,
    HookPoint,
    TokenFilter,
    auto_class,
    load_model,
    load_tokenizer,
    resolve_module,
)

MODEL_CLASSES = ("auto", *AUTO_CLASSES)
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(name: str, local_files_only: bool = False) -> Any:
    """The model's transformers config (config.json only); load failures as one ValueError."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except OSError as exc:
        raise ValueError(f"cannot load model {name!r}: {first_line(exc)}") from exc


def model_kind(config: Any, requested: str = "auto") -> str:
    """``requested`` unless ``auto``; then from what the checkpoint was saved as (the config's
    ``architectures``: ``*ForCausalLM`` / ``*LMHeadModel`` causal, ``*ForMaskedLM`` masked, any
    other, e.g. ``BertModel``, the bare model), or without that record from the model type:
    causal if transformers knows a causal LM but no masked LM for it, masked if it knows a
    masked LM, else the bare model."""
    if requested not in MODEL_CLASSES:
        raise ValueError(f"model class must be one of {MODEL_CLASSES}, got {requested!r}")
    if requested != "auto":
        return requested
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
    if getattr(config, "architectures", None):
        return "encoder"
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", None)
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked-lm"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "encoder"


def forward_kwargs(kind: str) -> dict[str, Any]:
    """Extra forward arguments: no KV cache for causal LMs (encoders may not take the flag)."""
    return {"use_cache": False} if kind == "causal-lm" else {}


def load_lm(
    name: str,
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = False,
    model_class: str = "auto",
) -> tuple[nn.Module, Any, str]:
    """Model (eval mode), tokenizer and model kind; load failures as one ValueError."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(MODEL_DTYPES)}, got {dtype!r}")
    kind = model_kind(load_config(name, local_files_only), model_class)
    try:
        tokenizer = load_tokenizer(name, local_files_only=local_files_only)
        model = load_model(
            name,
            kind=kind,
            dtype=MODEL_DTYPES[dtype],
            device=device,
            local_files_only=local_files_only,
        )
    except OSError as exc:
        raise ValueError(f"cannot load model {name!r}: {first_line(exc)}") from exc
    return model, tokenizer, kind


class HarvestSetup(NamedTuple):
    """A model loaded for harvesting at one hook: the one home of the set-up that ``saekit
    cache``, ``saekit eval --model`` and online training share."""

    model: nn.Module
    tokenizer: Any
    kind: str
    """causal-lm, masked-lm or encoder (:func:`model_kind`)."""
    hook: str
    """The hook point, normalised (``NAME`` or ``NAME:input``)."""
    bos_id: int | None
    """The id packing puts first in each context (:func:`saekit.data.lm.text.packing_token_ids`)."""
    token_filter: TokenFilter

    def harvester(
        self, *also: str, token_filter: TokenFilter | None = None, **options: Any
    ) -> Harvester:
        """A Harvester at the hook (and the hooks ``also``: one forward pass, stopped after the
        last of them) with this set-up's filter (or ``token_filter``: the report keeps every
        position to shade whole windows) and forward arguments."""
        return Harvester(
            self.model,
            [self.hook, *also],
            token_filter=token_filter or self.token_filter,
            forward_kwargs=forward_kwargs(self.kind),
            **options,
        )

    def width(self, hook: str) -> int:
        """The width of the activations at ``hook`` (one forward pass on two tokens)."""
        return activation_width(self.model, hook, self.kind)


def load_for_harvest(
    name: str,
    hook: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = False,
    model_class: str = "auto",
    bos_token: str = "auto",
    eos_token: str = "auto",
    **filter_options: bool,
) -> HarvestSetup:
    """Check the hook name on the meta device (before any weights load), load the model and
    tokenizer, and build the token filter (``filter_options``: TokenFilter's exclude_* flags)."""
    from saekit.data.lm.text import packing_token_ids

    hook = str(HookPoint.parse(hook))
    check_hook(name, hook, model_class, local_files_only)
    model, tokenizer, kind = load_lm(name, dtype, device, local_files_only, model_class)
    bos_id, _ = packing_token_ids(tokenizer, bos_token, eos_token)
    token_filter = TokenFilter.from_tokenizer(tokenizer, bos_token_id=bos_id, **filter_options)
    return HarvestSetup(model, tokenizer, kind, hook, bos_id, token_filter)


def meta_model(
    name: str, model_class: str = "auto", local_files_only: bool = False
) -> tuple[nn.Module, str]:
    """The model built from its config on the meta device (no weights read or initialised),
    in eval mode, and its kind."""
    config = load_config(name, local_files_only)
    kind = model_kind(config, model_class)
    with torch.device("meta"):
        model = auto_class(kind).from_config(config)
    return model.eval(), kind


def check_hook(
    name: str, hook: str, model_class: str = "auto", local_files_only: bool = False
) -> None:
    """Raise the one-line unknown-module error (with the suggested name) before any weights
    load. A model that cannot be built on the meta device (e.g. custom code) is not checked
    here; the harvester checks it once loaded."""
    point = HookPoint.parse(hook)
    config = load_config(name, local_files_only)
    kind = model_kind(config, model_class)
    try:
        with torch.device("meta"):
            model = auto_class(kind).from_config(config)
    except Exception:  # noqa: BLE001 - whatever fails on meta is left to the real load
        return
    resolve_module(model, point.module)


def model_hidden_size(name: str, local_files_only: bool = False) -> int:
    """The model's hidden size from its config (``hidden_size``, ``n_embd`` or ``d_model``),
    without loading weights: the width of residual-stream and block-output hooks."""
    config = load_config(name, local_files_only)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("hidden_size", "n_embd", "d_model"):
        width = getattr(config, attr, None)
        if isinstance(width, int):
            return width
    raise ValueError(
        f"model {name!r}: no hidden_size in its config; set saes.N.sae.d_in explicitly"
    )


def activation_width(model: nn.Module, hook: str, kind: str = "causal-lm") -> int:
    """Width of the activations at ``hook``, from one forward pass on two tokens."""
    probe = Harvester(
        model,
        hook,
        token_filter=TokenFilter(exclude_bos=False),
        forward_kwargs=forward_kwargs(kind),
    )
    ids = torch.zeros(1, 2, dtype=torch.long)
    return int(probe(ids, torch.ones_like(ids))[str(HookPoint.parse(hook))].shape[-1])
