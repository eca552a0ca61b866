"""Harvest activations from Hugging Face transformers models with forward hooks.

A hook point names a module (``model.get_submodule(name)``) and which side of it to read:

- ``transformer.h.8`` or ``transformer.h.8:output``: what block 8 returns (element 0 of a tuple);
- ``transformer.h.8:input``: its first positional input, i.e. the residual stream before the block
  (``resid_pre``; equals ``output_hidden_states[8]`` for GPT-2).

The forward pass stops right after the last needed hook fires: the hook raises a private
exception that :class:`Harvester` catches, so the later layers (and the LM head) never run.

Token filtering (:class:`TokenFilter`) drops padding, BOS and other special tokens, so each hook
yields a flat ``[n_tokens, d]`` tensor of the tokens an SAE should see.
"""

from __future__ import annotations

import difflib
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from saekit.data.lm.hook_names import family_hint

#: Key under which :class:`Harvester` returns the kept token ids when ``return_tokens=True``.
TOKEN_IDS = "token_ids"


@dataclass(frozen=True)
class HookPoint:
    """One place to read activations: a module name and the side of the module."""

    module: str
    """Dotted module name, as accepted by ``model.get_submodule``."""
    side: Literal["input", "output"] = "output"
    """``input``: the module's first positional argument; ``output``: what it returns."""

    @classmethod
    def parse(cls, spec: str | HookPoint) -> HookPoint:
        """Parse ``"name"``, ``"name:output"`` or ``"name:input"``."""
        if isinstance(spec, HookPoint):
            return spec
        name, sep, side = spec.partition(":")
        if not sep:
            return cls(name, "output")
        if side not in ("input", "output"):
            raise ValueError(f"hook point {spec!r}: side must be 'input' or 'output', got {side!r}")
        return cls(name, side)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.module if self.side == "output" else f"{self.module}:input"


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that suggests the right name."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = family_hint(model, name) + (f"; close matches: {', '.join(close)}" if close else "")
        raise ValueError(
            f"unknown module {name!r} in {type(model).__name__}{hint}"
            f" (all {len(names)} hook points: saekit hooks MODEL)"
        ) from None


def first_tensor(value: Any) -> Tensor:
    """Element 0 of a tuple/list/ModelOutput, or the tensor itself."""
    if isinstance(value, Tensor):
        return value
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def hook_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return first_tensor(args[0])
    if "hidden_states" in kwargs:
        return first_tensor(kwargs["hidden_states"])
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value
    raise TypeError("module was called without a tensor input")


@dataclass(frozen=True)
class TokenFilter:
    """Which token positions to keep. Padding is ``attention_mask == 0``."""

    exclude_padding: bool = True
    exclude_bos: bool = True
    """Drop every position whose id is ``bos_token_id`` (no effect when that id is None)."""
    exclude_special: bool = False
    """Drop every position whose id is in ``special_token_ids``."""
    bos_token_id: int | None = None
    special_token_ids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, bos_token_id: int | None = None, **options: bool
    ) -> TokenFilter:
        """Take the BOS and special ids from a transformers tokenizer. ``bos_token_id``: the id
        packing puts first in each context when it is not the tokenizer's BOS (BERT's [CLS],
        see :func:`saekit.data.lm.text.packing_token_ids`)."""
        special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        if bos_token_id is None:
            bos_token_id = getattr(tokenizer, "bos_token_id", None)
        return cls(bos_token_id=bos_token_id, special_token_ids=special, **options)

    def mask(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Boolean keep-mask with the shape of ``input_ids``."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        if self.exclude_padding and attention_mask is not None:
            keep &= attention_mask.to(input_ids.device).bool()
        if self.exclude_bos and self.bos_token_id is not None:
            keep &= input_ids != self.bos_token_id
        if self.exclude_special and self.special_token_ids:
            special = torch.tensor(sorted(self.special_token_ids), device=input_ids.device)
            keep &= ~torch.isin(input_ids, special)
        return keep


class _StopForward(Exception):
    """Raised from the last hook to abandon the rest of the forward pass."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def capture(model: nn.Module, hooks: Sequence[HookPoint], *, stop_after_last: bool):
    """Register hooks that store each hook point's tensor in the yielded dict.

    With ``stop_after_last`` the hook that completes the set raises :class:`_StopForward`.
    """
    captured: dict[HookPoint, Tensor] = {}
    handles = []

    def store(point: HookPoint, tensor: Tensor) -> None:
        if point in captured:
            raise RuntimeError(f"hook {point} fired twice in one forward pass (shared module?)")
        captured[point] = tensor
        if stop_after_last and len(captured) == len(hooks):
            raise _StopForward

    try:
        for point in hooks:
            module = resolve_module(model, point.module)
            if point.side == "output":

                def out_hook(_m, _args, output, point=point):
                    store(point, first_tensor(output))

                handles.append(module.register_forward_hook(out_hook))
            else:

                def in_hook(_m, args, kwargs, point=point):
                    store(point, hook_input(args, kwargs))

                handles.append(module.register_forward_pre_hook(in_hook, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class Harvester:
    """Run a model on token batches and return the activations at one or more hook points.

    ``harvester(input_ids, attention_mask)`` returns ``{hook: [n_kept, d]}`` where ``n_kept`` is
    the number of positions kept by ``token_filter`` (same positions for every hook), plus
    ``TOKEN_IDS -> [n_kept]`` when ``return_tokens``. The model is put in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        hooks: Sequence[str | HookPoint] | str,
        *,
        token_filter: TokenFilter | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        return_tokens: bool = False,
        early_stop: bool = True,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(hooks, (str, HookPoint)):
            hooks = [hooks]
        self.hooks = [HookPoint.parse(h) for h in hooks]
        if not self.hooks:
            raise ValueError("at least one hook point is needed")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"duplicate hook points in {[str(h) for h in self.hooks]}")
        for point in self.hooks:
            resolve_module(model, point.module)  # fail early on a bad name
        self.model = model.eval()
        self.token_filter = token_filter or TokenFilter()
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.return_tokens = return_tokens
        self.early_stop = early_stop
        self.forward_kwargs = dict(
            {"use_cache": False} if forward_kwargs is None else forward_kwargs
        )

    @torch.no_grad()
    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        dev = model_device(self.model)
        input_ids = input_ids.to(dev)
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
        with capture(self.model, self.hooks, stop_after_last=self.early_stop) as captured:
            try:
                self.model(
                    input_ids=input_ids, attention_mask=attention_mask, **self.forward_kwargs
                )
            except _StopForward:
                pass
        missing = [str(h) for h in self.hooks if h not in captured]
        if missing:
            raise RuntimeError(
                f"hook(s) never fired during the forward pass: {', '.join(missing)}"
                " (is the module used by this model's forward?)"
            )
        keep_BT = self.token_filter.mask(input_ids, attention_mask)
        out: dict[str, Tensor] = {}
        for point in self.hooks:
            act = captured[point]
            if act.shape[:2] != input_ids.shape:
                raise ValueError(
                    f"hook {point} emitted shape {tuple(act.shape)}, expected [batch, seq, ...] ="
                    f" {tuple(input_ids.shape)} + ..."
                )
            act_ND = act[keep_BT].reshape(int(keep_BT.sum()), -1)  # [B, T, d] -> [N, d]
            out[str(point)] = self._place(act_ND)
        if self.return_tokens:
            ids = input_ids[keep_BT]
            out[TOKEN_IDS] = ids.to(self.device) if self.device is not None else ids
        return out

    def _place(self, act: Tensor) -> Tensor:
        device = act.device if self.device is None else self.device
        return act.to(device=device, dtype=self.dtype or act.dtype)

    def stream(self, batches: Iterable[Any], *, prefetch: int = 0) -> Iterator[dict[str, Tensor]]:
        """Harvest each batch (a tensor of ids, a ``(ids, mask)`` pair or a dict with
        ``input_ids`` and optional ``attention_mask``).

        ``prefetch > 0`` runs the model in a background thread up to ``prefetch`` batches
        ahead, so the consumer's work (e.g. SAE steps) overlaps the model forward; torch
        releases the GIL inside its kernels.
        """
        if prefetch <= 0:
            for batch in batches:
                yield self(*unpack_batch(batch))
            return
        yield from prefetched((self(*unpack_batch(b)) for b in batches), prefetch)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"cannot read input_ids from a batch of type {type(batch).__name__}")


_DONE = object()


def prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Produce ``items`` in a worker thread, at most ``depth`` ahead of the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
            slots.put(_DONE)
        except BaseException as exc:  # hand the error to the consumer
            slots.put(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.01)


#: transformers Auto classes by model kind (``--model-class``; saekit.data.lm.models picks one).
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "encoder": "AutoModel",
}


def auto_class(kind: str) -> Any:
    """The transformers Auto class of a model kind (a key of :data:`AUTO_CLASSES`)."""
    import transformers

    if kind not in AUTO_CLASSES:
        raise ValueError(f"model class must be one of {sorted(AUTO_CLASSES)}, got {kind!r}")
    return getattr(transformers, AUTO_CLASSES[kind])


def load_model(
    name_or_path: str,
    *,
    kind: str = "causal-lm",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    local_files_only: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a transformers model (local directory or hub id) in eval mode.

    ``kind``: causal-lm (``AutoModelForCausalLM``, needed for CE/KL evaluation), masked-lm or
    encoder (``AutoModel``, the bare model without a head).
    """
    model = auto_class(kind).from_pretrained(
        name_or_path,
        dtype=dtype,
        local_files_only=local_files_only,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device).eval()


def load_tokenizer(
    name_or_path: str, *, local_files_only: bool = False, revision: str | None = None
) -> Any:
    """``AutoTokenizer.from_pretrained`` with the same location options as :func:`load_model`."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        name_or_path, local_files_only=local_files_only, revision=revision
    )
