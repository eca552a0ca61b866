"""Several models run on the same tokens: model diffing (a base model and its fine-tune).

A model set maps labels to models, in order, e.g. ``{base: google/gemma-2-2b, chat:
google/gemma-2-2b-it}`` (``data.models``, ``saekit cache --models base=ID chat=ID``). A hook of
a model set is named ``LABEL/HOOK`` (``base/model.layers.13``, ``chat/model.layers.13:input``),
so the same hook of two models gives two distinct columns of a batch (saekit.data.hook_columns)
and a crosscoder reads both (``data.input_hooks: [base/model.layers.13, chat/model.layers.13]``;
Lindsey et al. 2024, "Sparse Crosscoders", model diffing).

Every model reads the same token ids: the text is tokenised and packed once, with the first
model's tokenizer, and one token filter (the first model's BOS) keeps the same positions in
every model, so row i of every model's activations is the same token. That is only meaningful
when every model maps tokens to the same ids, so the models' vocabularies must be equal
(:func:`check_same_tokenizer`: a fine-tune that only changed its chat template or EOS passes; one
that added tokens is refused in one line). Each model's forward stops after its own last hook.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from saekit.data.lm.harvester import TOKEN_IDS, Harvester, HookPoint, TokenFilter, load_tokenizer
from saekit.data.lm.models import (
    HarvestSetup,
    activation_width,
    check_hook,
    first_line,
    forward_kwargs,
    load_for_harvest,
)

SEPARATOR = "/"
"""Between a model's label and its hook: ``base/model.layers.13`` (module names never hold one)."""
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A label: letters, digits, ``_ . -``, starting with a letter or digit."""


def check_models(models: Any, where: str) -> dict[str, str]:
    """``models`` as a checked ``{label: model}`` mapping of at least two models, in order."""
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError(
            f"{where} names the models run on the same tokens by label, at least two, e.g."
            f" {{base: MODEL, chat: MODEL}}; got {models!r}"
        )
    for label, model in models.items():
        if not isinstance(label, str) or not LABEL.fullmatch(label):
            raise ValueError(
                f"{where}: label {label!r} must be letters, digits, '_', '.' or '-' (hooks are"
                f" named LABEL{SEPARATOR}HOOK)"
            )
        if not isinstance(model, str) or not model:
            raise ValueError(
                f"{where}.{label}: expected a model hub id or directory, got {model!r}"
            )
    return dict(models)


def parse_model_specs(specs: Sequence[str], flag: str = "--models") -> dict[str, str]:
    """``["base=ID", "chat=ID"]`` (a command line's LABEL=MODEL pairs) as a checked mapping."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, model = spec.partition("=")
        if not sep:
            raise ValueError(f"{flag} {spec!r}: expected LABEL=MODEL, e.g. base=google/gemma-2-2b")
        if label in models:
            raise ValueError(f"{flag}: label {label!r} is given twice")
        models[label] = model
    return check_models(models, flag)


def describe_models(models: Mapping[str, str]) -> str:
    """``base=ID, chat=ID``: a model set as one string (a cache manifest's and an SAE's
    ``model_name``)."""
    return ", ".join(f"{label}={model}" for label, model in models.items())


def qualified(label: str, hook: str | HookPoint) -> str:
    """``LABEL/HOOK``, the hook normalised (``NAME`` or ``NAME:input``)."""
    return f"{label}{SEPARATOR}{HookPoint.parse(hook)}"


def split_hook(name: str, models: Mapping[str, str] | None, where: str) -> tuple[str | None, str]:
    """(label, hook) of a hook name: ``LABEL/HOOK`` of a model set (None: a single model's
    ``HOOK``, then it must name no label). One-line errors name ``where``."""
    label, sep, hook = name.partition(SEPARATOR)
    if models is None:
        if sep:
            raise ValueError(
                f"{where}: {name!r} names model {label!r}, but no model set is given (data.models,"
                " saekit cache --models)"
            )
        return None, name
    if not sep:
        example = qualified(next(iter(models)), name)
        raise ValueError(
            f"{where}: {name!r} names no model; with several models name hooks"
            f" LABEL{SEPARATOR}HOOK, e.g. {example!r} (labels: {', '.join(models)})"
        )
    if label not in models:
        raise ValueError(f"{where}: {name!r} names model {label!r}, not one of {list(models)}")
    return label, str(HookPoint.parse(hook))


def hooks_by_model(
    names: Iterable[str], models: Mapping[str, str], where: str
) -> dict[str, list[str]]:
    """``{label: [HOOK, ...]}`` of qualified hook names, in the order of ``models`` (a model
    without a hook is left out)."""
    grouped: dict[str, list[str]] = {label: [] for label in models}
    for name in names:
        label, hook = split_hook(str(name), models, where)
        grouped[label].append(hook)  # type: ignore[index]
    return {label: hooks for label, hooks in grouped.items() if hooks}


def manifest_problem(models: Any, names: Sequence[str]) -> str | None:
    """Why a cache manifest's ``models`` (None: absent) and hook ``names`` disagree, or None."""
    try:
        checked = None if models is None else check_models(models, "models")
        for i, name in enumerate(names):
            split_hook(name, checked, f"hooks.{i}")
    except ValueError as exc:
        return str(exc)
    return None


def check_same_tokenizer(tokenizers: Mapping[str, Any], models: Mapping[str, str]) -> None:
    """Refuse, in one line, models whose vocabularies differ from the first model's (the text
    is tokenised once, with that model's tokenizer, and every model reads those ids)."""
    (first, reference), *others = tokenizers.items()
    vocab = reference.get_vocab()
    for label, tokenizer in others:
        other = tokenizer.get_vocab()
        moved = sum(other.get(token) != index for token, index in vocab.items())
        moved += len(other.keys() - vocab.keys())
        if moved:
            raise ValueError(
                f"model {label!r} ({models[label]}) has another tokenizer than {first!r}"
                f" ({models[first]}): {moved} of {max(len(vocab), len(other))} tokens differ;"
                " model diffing runs every model on the same token ids, so the models must share"
                " a vocabulary"
            )


class ModelSetHarvester:
    """A :class:`Harvester` over several models on the same token ids: ``{LABEL/HOOK: [n, d]}``
    (and ``TOKEN_IDS`` once); the same interface, so :func:`saekit.data.lm.harvest.harvest`,
    the cache and the sources take it as they take one model's."""

    def __init__(self, parts: Mapping[str, Harvester], token_filter: TokenFilter) -> None:
        self.parts = dict(parts)
        self.token_filter = token_filter
        self.hooks = [
            HookPoint.parse(qualified(label, hook))
            for label, harvester in self.parts.items()
            for hook in harvester.hooks
        ]

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for label, harvester in self.parts.items():
            for key, value in harvester(input_ids, attention_mask).items():
                out[key if key == TOKEN_IDS else f"{label}{SEPARATOR}{key}"] = value
        return out


@dataclass
class ModelSetSetup:
    """Models loaded for harvesting on the same tokens: what :class:`HarvestSetup` is for one
    model (``tokenizer``, ``bos_id``, ``token_filter``: the first model's; ``hook``: the first
    qualified hook; ``harvester``; ``width``), over every model of the set."""

    setups: dict[str, HarvestSetup]
    """Each model's set-up, by label, in order."""
    models: dict[str, str]
    """label → model id or directory."""
    hook: str
    """The first hook, qualified (``LABEL/HOOK``)."""

    @property
    def first(self) -> HarvestSetup:
        return next(iter(self.setups.values()))

    @property
    def tokenizer(self) -> Any:
        return self.first.tokenizer

    @property
    def kind(self) -> str:
        """The first model's kind (causal-lm, masked-lm, encoder)."""
        return self.first.kind

    @property
    def bos_id(self) -> int | None:
        return self.first.bos_id

    @property
    def token_filter(self) -> TokenFilter:
        return self.first.token_filter

    def harvester(
        self, *also: str, token_filter: TokenFilter | None = None, **options: Any
    ) -> ModelSetHarvester:
        """A harvester of ``hook`` and the qualified hooks ``also``: each model run once on the
        same ids, stopped after its last hook, all with one token filter."""
        token_filter = token_filter or self.token_filter
        grouped = hooks_by_model([self.hook, *also], self.models, "hooks")
        parts = {
            label: Harvester(
                self.setups[label].model,
                hooks,
                token_filter=token_filter,
                forward_kwargs=forward_kwargs(self.setups[label].kind),
                **options,
            )
            for label, hooks in grouped.items()
        }
        return ModelSetHarvester(parts, token_filter)

    def width(self, name: str) -> int:
        """The width of the activations at the qualified hook ``name``."""
        label, hook = split_hook(name, self.models, "hooks")
        setup = self.setups[label]  # type: ignore[index]
        return activation_width(setup.model, hook, setup.kind)


def load_model_set(
    models: Mapping[str, str],
    hooks: Sequence[str],
    *,
    where: str = "data.models",
    dtype: str = "float32",
    device: str = "cpu",
    local_files_only: bool = False,
    model_class: str = "auto",
    bos_token: str = "auto",
    eos_token: str = "auto",
    **filter_options: bool,
) -> ModelSetSetup:
    """Check every hook name on the meta device and the tokenizers' vocabularies (before any
    weights load), then load each model with a hook among ``hooks`` (qualified names); a model
    of the set with no hook is refused (it would be loaded for nothing). The options are
    :func:`saekit.data.lm.models.load_for_harvest`'s, the same for every model."""
    models = check_models(models, where)
    grouped = hooks_by_model(hooks, models, "hooks")
    idle = [label for label in models if label not in grouped]
    if idle:
        raise ValueError(
            f"{where}: no hook of model {idle[0]!r} is harvested; name its hooks"
            f" {idle[0]}{SEPARATOR}HOOK or leave it out"
        )
    for label, names in grouped.items():
        for hook in names:
            check_hook(models[label], hook, model_class, local_files_only)
    tokenizers = {}
    for label, model in models.items():
        try:
            tokenizers[label] = load_tokenizer(model, local_files_only=local_files_only)
        except OSError as exc:
            raise ValueError(f"cannot load the tokenizer of {model!r}: {first_line(exc)}") from exc
    check_same_tokenizer(tokenizers, models)
    setups = {}
    for label, names in grouped.items():
        setups[label] = load_for_harvest(
            models[label],
            names[0],
            dtype=dtype,
            device=device,
            local_files_only=local_files_only,
            model_class=model_class,
            bos_token=bos_token,
            eos_token=eos_token,
            **filter_options,
        )
    return ModelSetSetup(setups, models, str(HookPoint.parse(hooks[0])))


def load_harvest(
    model: str | None,
    models: Mapping[str, str] | None,
    hooks: Sequence[str],
    *,
    where: str = "data.models",
    **options: Any,
) -> HarvestSetup | ModelSetSetup:
    """``model`` loaded for harvesting at ``hooks[0]`` (:func:`load_for_harvest`), or with
    ``models`` the model set of ``hooks`` (:func:`load_model_set`): the same surface."""
    if models:
        return load_model_set(models, hooks, where=where, **options)
    return load_for_harvest(model, hooks[0], **options)  # type: ignore[arg-type]
