"""LM-splice evaluation: next-token CE and KL with a reconstruction spliced in at a hook point.

For each batch the model runs three times: clean; with the hook's activation replaced by
``reconstruct(act)``; with it zero-ablated. Replacement happens only at the positions the
:class:`~saekit.data.lm.harvester.TokenFilter` keeps (the tokens an SAE is trained on); the other
positions keep their clean activations.

Evaluated tokens: positions ``t < T-1`` kept by the filter whose target ``t+1`` is not padding.
All losses are token means over the whole evaluation set (sum over tokens / count, never a
mean of per-batch means). With KL(p_clean ‖ p_patched) per token (DESIGN.md, Metrics):

    CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    KL score = (KL_zero − KL_sae) / KL_zero

FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over the spliced positions (x̄ their mean), accumulated in float64.

Transcoders (``input_hook``): the activation at ``hook`` (the target, e.g. an MLP's output) is
replaced by ``reconstruct`` of the activation at ``input_hook`` (e.g. the MLP's input) of the
same forward pass, at the same positions; the FVU is the target's, the zero-ablation zeroes the
target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.data.lm.harvester import (
    HookPoint,
    TokenFilter,
    capture,
    model_device,
    resolve_module,
    unpack_batch,
)
from saekit.eval.metrics import MetricAccumulator


@dataclass(frozen=True)
class SpliceResult:
    """Token-mean losses (nats) and scores of one splice evaluation."""

    ce_clean: float
    """CE of the unmodified model."""
    ce_sae: float
    """CE with the activation replaced by ``reconstruct(act)``."""
    ce_zero: float
    """CE with the activation zero-ablated."""
    ce_score: float
    """(ce_zero − ce_sae) / (ce_zero − ce_clean): 1 = perfect, 0 = as bad as zero-ablation."""
    kl_sae: float
    """Mean KL(p_clean ‖ p_sae) per token."""
    kl_zero: float
    """Mean KL(p_clean ‖ p_zero) per token."""
    kl_score: float
    """(kl_zero − kl_sae) / kl_zero."""
    fvu: float
    """Fraction of variance unexplained by ``reconstruct`` at the spliced positions."""
    n_tokens: int
    """Number of evaluated (predicting) tokens."""
    n_spliced: int
    """Number of positions whose activation was replaced (the FVU's token count)."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot splice into a module output of type {type(value).__name__}")


@contextmanager
def patch_activation(model: nn.Module, hook: str | HookPoint, edit: Callable[[Tensor], Tensor]):
    """While active, the activation at ``hook`` ([B, T, d]) is replaced by ``edit(act)``."""
    point = HookPoint.parse(hook)
    module = resolve_module(model, point.module)
    if point.side == "output":

        def out_hook(_m, _args, output):
            first = output if isinstance(output, Tensor) else output[0]
            return _replace_first(output, edit(first))

        handle = module.register_forward_hook(out_hook)
    else:

        def in_hook(_m, args, kwargs):
            if args:
                return (_replace_first(args, edit(args[0])), kwargs)
            if "hidden_states" in kwargs:
                return (args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])})
            raise TypeError(f"{point.module} was called without a positional input")

        handle = module.register_forward_pre_hook(in_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} returns no logits: load it with AutoModelForCausalLM"
        )
    return logits


class SpliceTotals:
    """Float64 running sums over tokens; the FVU sums live in :class:`MetricAccumulator`."""

    def __init__(self, reconstruction: MetricAccumulator | None = None) -> None:
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}
        self.n_tokens = 0
        self.reconstruction = reconstruction

    def add_reconstruction(self, x_ND: Tensor, x_hat_ND: Tensor) -> None:
        if self.reconstruction is None:
            self.reconstruction = MetricAccumulator(x_ND.shape[-1], 1, device=x_ND.device)
        self.reconstruction.add_reconstruction(x_ND, x_hat_ND)

    @property
    def n_spliced(self) -> int:
        return 0 if self.reconstruction is None else int(self.reconstruction.n)

    def fvu(self) -> float:
        if self.reconstruction is None:
            return float("nan")
        return float(self.reconstruction.fvu())

    def result(self, fvu: float, n_spliced: int) -> SpliceResult:
        """The token means and the scores: the one home of the CE and KL score formulas."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated (empty batches or everything filtered out)")
        n = self.n_tokens
        ce = {k: v / n for k, v in self.ce.items()}
        kl = {k: v / n for k, v in self.kl.items()}
        ce_gap = ce["zero"] - ce["clean"]
        return SpliceResult(
            ce_clean=ce["clean"],
            ce_sae=ce["sae"],
            ce_zero=ce["zero"],
            ce_score=(ce["zero"] - ce["sae"]) / ce_gap if ce_gap != 0 else float("nan"),
            kl_sae=kl["sae"],
            kl_zero=kl["zero"],
            kl_score=(kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] != 0 else float("nan"),
            fvu=fvu,
            n_tokens=n,
            n_spliced=n_spliced,
        )


Patch = Callable[[str, Tensor], AbstractContextManager[Any]]
"""``patch(name, keep_BT)``: a context manager that installs the edits of the pass ``name``
(``"sae"``: the reconstruction, ``"zero"``: zero-ablation) for a batch whose spliced positions
are ``keep_BT``; ``"clean"`` (the unpatched pass) may install hooks that only read."""


def run_passes(
    model: nn.Module,
    batches: Iterable[Any],
    patch: Patch,
    *,
    token_filter: TokenFilter | None = None,
    max_batches: int | None = None,
    totals: SpliceTotals | None = None,
) -> SpliceTotals:
    """The clean, spliced and zero-ablated passes of every batch; CE and KL summed over the
    evaluated tokens (module docstring) in float64. Shared by :func:`splice_eval` (one hook)
    and :mod:`saekit.eval.replacement` (every layer of a cross-layer transcoder at once)."""
    model.eval()
    token_filter = token_filter or TokenFilter()
    dev = model_device(model)
    totals = totals or SpliceTotals()
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        input_ids, attention_mask = unpack_batch(batch)
        input_ids = input_ids.to(dev)
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
        keep_BT = token_filter.mask(input_ids, attention_mask)
        # position t predicts t+1: evaluate kept positions whose target is a real token
        eval_BT = keep_BT.clone()
        eval_BT[:, -1] = False
        if attention_mask is not None:
            eval_BT[:, :-1] &= attention_mask[:, 1:].bool()
        targets_n = input_ids[:, 1:][eval_BT[:, :-1]]  # [n]

        with patch("clean", keep_BT):
            logits = _logits(model, input_ids, attention_mask)
        logp_clean_nV = F.log_softmax(logits[eval_BT].float(), -1)
        totals.ce["clean"] += _ce_sum(logp_clean_nV, targets_n)
        for name in ("sae", "zero"):
            with patch(name, keep_BT):
                logits = _logits(model, input_ids, attention_mask)
            logp_nV = F.log_softmax(logits[eval_BT].float(), -1)
            totals.ce[name] += _ce_sum(logp_nV, targets_n)
            # KL(p_clean ‖ p_patched) = Σ_v p_clean (log p_clean − log p_patched)
            kl_n = F.kl_div(logp_nV, logp_clean_nV, log_target=True, reduction="none").sum(-1)
            totals.kl[name] += float(kl_n.double().sum())
        totals.n_tokens += len(targets_n)
    return totals


def zero_kept(keep_BT: Tensor) -> Callable[[Tensor], Tensor]:
    """The zero-ablation edit: the kept positions of [B, T, d] set to 0."""
    return lambda act_BTd: act_BTd.masked_fill(keep_BT[..., None], 0)


@torch.no_grad()
def splice_eval(
    model: nn.Module,
    hook: str | HookPoint,
    reconstruct: Callable[[Tensor], Tensor],
    batches: Iterable[Any],
    *,
    token_filter: TokenFilter | None = None,
    max_batches: int | None = None,
    input_hook: str | HookPoint | None = None,
    reconstruction: MetricAccumulator | None = None,
) -> SpliceResult:
    """CE/KL of ``model`` with ``reconstruct`` ([n, d] -> [n, d]) spliced in at ``hook``.

    ``batches``: tensors of token ids, ``(ids, mask)`` pairs or dicts (as
    :meth:`Harvester.stream`). The model is put in eval mode. ``input_hook``: a transcoder's
    input ([n, d_in] -> [n, d] predicts ``hook``'s activation; module docstring).
    ``reconstruction``: the accumulator the FVU sums go into (default a new one), for a caller
    that also wants the target's other reconstruction metrics.
    """
    source = None if input_hook is None else HookPoint.parse(input_hook)
    totals = SpliceTotals(reconstruction)

    @contextmanager
    def patch(name: str, keep_BT: Tensor) -> Iterator[None]:
        with ExitStack() as stack:
            if name == "zero":
                stack.enter_context(patch_activation(model, hook, zero_kept(keep_BT)))
            elif name == "sae":
                read = None
                if source is not None:  # the input, recorded on the way
                    inputs = stack.enter_context(capture(model, [source], stop_after_last=False))
                    read = lambda inputs=inputs: _read(inputs, source)  # noqa: E731
                edit = _reconstruct_edit(keep_BT, reconstruct, totals, read)
                stack.enter_context(patch_activation(model, hook, edit))
            yield

    run_passes(
        model, batches, patch, token_filter=token_filter, max_batches=max_batches, totals=totals
    )
    return totals.result(totals.fvu(), totals.n_spliced)


def _read(inputs: dict[HookPoint, Tensor], point: HookPoint) -> Tensor:
    if point not in inputs:
        raise ValueError(f"input hook {point} had not fired when the target hook did")
    return inputs[point]


def _reconstruct_edit(
    keep_BT: Tensor,
    reconstruct: Callable[[Tensor], Tensor],
    totals: SpliceTotals,
    read_input: Callable[[], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """Replace the kept positions of [B, T, d] by their reconstruction (a transcoder's: the
    prediction from ``read_input()``, the input hook's [B, T, d_in] of the same pass); record
    FVU sums."""

    def edit(act_BTd: Tensor) -> Tensor:
        x_ND = act_BTd[keep_BT]
        x_hat_ND = reconstruct(x_ND if read_input is None else read_input()[keep_BT])
        if x_hat_ND.shape != x_ND.shape:
            raise ValueError(
                f"reconstruct returned shape {tuple(x_hat_ND.shape)} for the activation's"
                f" {tuple(x_ND.shape)}"
            )
        totals.add_reconstruction(x_ND, x_hat_ND)
        out_BTd = act_BTd.clone()
        out_BTd[keep_BT] = x_hat_ND.to(act_BTd.dtype)
        return out_BTd

    return edit


def _ce_sum(logp_nV: Tensor, targets_n: Tensor) -> float:
    return float(-logp_nV.gather(1, targets_n[:, None]).double().sum())
