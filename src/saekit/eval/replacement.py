"""A cross-layer transcoder (CLT) spliced into the model in place of every MLP it covers at once:
the replacement model's CE and KL (the formulas and passes of :mod:`saekit.eval.splice`), each
target layer's FVU and each layer's L0.

Which residuals the CLT reads. Layer l's latents read layer l's input hook; target t's prediction
ŷ^t = Σ_{l ≤ t} z^l W_dec^{l→t} + b_dec^t needs the codes of layers 0..t. In the spliced ("sae")
pass the inputs are the replacement model's own: the hooks fire in the order the model runs, so
layer l's input already carries the predictions that replaced the MLPs of layers < l, and target
t's output is replaced by ŷ^t computed from those spliced inputs. This is the forward of
circuit-tracer's replacement model (Ameisen et al. 2025, "Circuit Tracing", §2: the CLT's
features, computed from the replacement model's residual stream, stand in for every MLP), and the
one whose CE is the model the CLT claims to replace: feeding each layer the clean model's
residuals instead would score L independent one-layer splices and hide how errors compound
through the layers. The clean pass, which runs anyway for the reference logits, gives the offline
metrics: each layer's code and each target's prediction from the clean inputs against the clean
targets (the per-target FVU and per-layer L0, as the CLT is trained and as a cache evaluates it).
The spliced pass adds each target's ``spliced_fvu``: its prediction against what the real MLP
computes on the spliced residual.

Zero-ablation zeroes every covered MLP's output at the spliced positions. Only the positions the
token filter keeps are replaced (as in :mod:`saekit.eval.splice`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from saekit.core.encoding import SparseCode
from saekit.data.lm.harvester import HookPoint, TokenFilter, capture
from saekit.eval.metrics import EvalResult
from saekit.eval.parts import PartAccumulator, PartScores
from saekit.eval.splice import SpliceResult, patch_activation, run_passes, zero_kept
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.clt_layers import LayerByLayer

Code = Tensor | SparseCode


class LayerReader(Protocol):
    """A CLT's forward one layer at a time (saekit.model.clt_layers.LayerByLayer):
    ``read(l, x^l)`` [n, d_in] in layer order, ``predict(t)`` [n, d_out_t] once layers 0..t are
    read."""

    def read(self, layer: int, x: Tensor) -> Any: ...

    def predict(self, target: int) -> Tensor: ...


@dataclass(frozen=True)
class LayeredDictionary:
    """What the splice needs of a cross-layer transcoder: its hooks and widths, and its own
    forward (so no formula is copied here)."""

    input_hooks: Sequence[str]
    """Layer l's input hook (what its latents read), in layer order."""
    target_hooks: Sequence[str]
    """Target t's hook (the MLP output its prediction replaces), in layer order."""
    d_in: int
    """Width of each input."""
    target_widths: Sequence[int]
    """d_out of each target."""
    d_sae: int
    """M: latents per layer."""
    run: Callable[[Tensor], tuple[Code, Tensor]]
    """x [n, L·d_in] (the L inputs side by side) -> (the code [n, L·M], latent l·M + i being
    latent i of layer l; the L predictions side by side [n, Σ d_out], in the targets' units).
    Layer-separable: layer l's code reads only x^l, so ŷ^t reads only x^0..x^t."""
    layer_by_layer: Callable[[], LayerReader] | None = None
    """A fresh reader of the same forward one layer at a time (the spliced pass encodes each
    layer once); None: the spliced pass runs ``run`` once per target, on the inputs so far and
    zeros after (L runs of every layer's encoder per batch)."""

    def __post_init__(self) -> None:
        n = len(self.input_hooks)
        if n == 0 or len(self.target_hooks) != n or len(self.target_widths) != n:
            raise ValueError(
                f"a CLT needs one input hook, target hook and width per layer, got"
                f" {len(self.input_hooks)}, {len(self.target_hooks)}, {len(self.target_widths)}"
            )

    @classmethod
    def of(cls, clt: CrossLayerTranscoder) -> LayeredDictionary:
        """A CLT's own forward, in eval mode (every activation a CLT accepts is layer-separable
        at inference: TopK per layer, BatchTopK's calibrated threshold, the others per
        latent)."""
        cfg = clt.cfg
        if cfg.hooks is None or cfg.target_hooks is None:
            raise ValueError(
                "this cross-layer transcoder's cfg.json names no hooks and target_hooks (trained"
                " on synthetic data?): it cannot be spliced into a model"
            )
        clt.eval()

        def run(x: Tensor) -> tuple[Code, Tensor]:
            out = clt(x)
            return out.latents, out.x_hat

        widths = [cfg.d_out] * cfg.n_layers
        return cls(
            cfg.hooks, cfg.target_hooks, cfg.d_in, widths, cfg.d_sae, run, lambda: LayerByLayer(clt)
        )

    def reader(self) -> LayerReader:
        """A fresh one-layer-at-a-time forward: the dictionary's own, else :class:`_Rerun`."""
        return self.layer_by_layer() if self.layer_by_layer is not None else _Rerun(self)

    def target(self, y_hat: Tensor, t: int) -> Tensor:
        """Target t's columns of the predictions [n, Σ d_out]."""
        start = sum(self.target_widths[:t])
        return y_hat[:, start : start + self.target_widths[t]]


@dataclass(frozen=True)
class ReplacementResult:
    """The CLT spliced in for every covered MLP at once."""

    splice: SpliceResult
    """CE and KL of the replacement model against the clean and the zero-ablated model (its
    ``fvu``: the pooled FVU of the clean pass)."""
    whole: EvalResult
    """Pooled FVU and MSE over the targets; total L0 (every layer's latents), dead and dense
    shares over all L·M latents; from the clean pass."""
    layers: list[PartScores]
    """Per layer: its target's FVU and MSE, its latents' L0 and dead share (clean pass), and
    its target's ``spliced_fvu``."""


@torch.no_grad()
def replacement_eval(
    model: nn.Module,
    clt: LayeredDictionary,
    batches: Iterable[Any],
    *,
    token_filter: TokenFilter | None = None,
    max_batches: int | None = None,
) -> ReplacementResult:
    """CE/KL, per-target FVU and per-layer L0 of ``clt`` spliced into ``model`` (module
    docstring). ``batches`` as :func:`saekit.eval.splice.splice_eval` takes them.

    In the spliced pass each layer's input is encoded once, when the first target that needs it
    fires (its own: a layer's input comes before its MLP's output), and its decode added into
    the running predictions of its targets (``clt.reader()``): ŷ^t is complete once layers
    0..t are read. Every layer's encoder runs once per pass, as in the clean pass."""
    inputs = [HookPoint.parse(h) for h in clt.input_hooks]
    targets = [HookPoint.parse(h) for h in clt.target_hooks]
    L = len(inputs)
    device = next(iter(model.parameters())).device
    acc = PartAccumulator(
        [str(t) for t in targets],
        clt.target_widths,
        layer_latents=clt.d_sae,
        device=device,
        input_hooks=[str(p) for p in inputs],
    )

    def layer_input(acts: dict[HookPoint, Tensor], keep_BT: Tensor, layer: int, t: int) -> Tensor:
        """[n, d_in]: layer ``layer``'s input at the kept positions, read when target t fires."""
        point = inputs[layer]
        if point not in acts:
            raise ValueError(
                f"the input hook {point} of layer {layer} had not fired when target"
                f" {targets[t]} did: a layer's input must come before its target's output"
            )
        return acts[point][keep_BT]

    def stacked(acts: dict[HookPoint, Tensor], keep_BT: Tensor) -> Tensor:
        """[n, L·d_in]: every layer's input at the kept positions."""
        return torch.cat([layer_input(acts, keep_BT, layer, L - 1) for layer in range(L)], -1)

    @contextmanager
    def patch(name: str, keep_BT: Tensor) -> Iterator[None]:
        if name == "clean":  # read every input and target; score the offline prediction
            with capture(model, [*inputs, *targets], stop_after_last=False) as acts:
                yield
            code, y_hat = clt.run(stacked(acts, keep_BT))
            acc.add_latents(code)
            for t in range(L):
                acc.add(t, acts[targets[t]][keep_BT], clt.target(y_hat, t))
            return
        with ExitStack() as stack:
            if name == "zero":
                for target in targets:
                    stack.enter_context(patch_activation(model, target, zero_kept(keep_BT)))
            else:
                acts = stack.enter_context(capture(model, inputs, stop_after_last=False))
                reader, n_read = clt.reader(), 0

                def predict(t: int) -> Tensor:
                    nonlocal n_read
                    for layer in range(n_read, t + 1):  # each layer once, in order
                        reader.read(layer, layer_input(acts, keep_BT, layer, t))
                    n_read = max(n_read, t + 1)
                    return reader.predict(t)

                for t, target in enumerate(targets):
                    edit = _replace_edit(t, keep_BT, partial(predict, t), clt, acc)
                    stack.enter_context(patch_activation(model, target, edit))
            yield

    totals = run_passes(model, batches, patch, token_filter=token_filter, max_batches=max_batches)
    whole, layers = acc.result()
    return ReplacementResult(totals.result(whole.fvu, whole.n_tokens), whole, layers)


def _replace_edit(
    t: int,
    keep_BT: Tensor,
    predict: Callable[[], Tensor],
    clt: LayeredDictionary,
    acc: PartAccumulator,
) -> Callable[[Tensor], Tensor]:
    """Target t's edit in the spliced pass: its kept positions replaced by ŷ^t from the inputs
    of layers 0..t of this same pass (``predict``)."""

    def edit(act_BTd: Tensor) -> Tensor:
        y_hat = predict()
        y = act_BTd[keep_BT]
        if y_hat.shape != y.shape:
            raise ValueError(
                f"the CLT predicts shape {tuple(y_hat.shape)} for target {clt.target_hooks[t]}"
                f" of shape {tuple(y.shape)}"
            )
        acc.add_spliced(t, y, y_hat)
        out = act_BTd.clone()
        out[keep_BT] = y_hat.to(act_BTd.dtype)
        return out

    return edit


class _Rerun:
    """The one-layer-at-a-time reader of a dictionary given only as ``run``: ``predict(t)`` runs
    it on the inputs read so far, zeros after (layer separability makes ŷ^t exact whatever
    they are), so each target costs a run of every layer's encoder."""

    def __init__(self, clt: LayeredDictionary):
        self.clt = clt
        self.xs: list[Tensor] = []

    def read(self, layer: int, x: Tensor) -> None:
        if layer != len(self.xs):
            raise ValueError(f"layers are read in order: layer {len(self.xs)} next, not {layer}")
        self.xs.append(x)

    def predict(self, target: int) -> Tensor:
        later = len(self.clt.input_hooks) - len(self.xs)
        x = torch.cat(
            [*self.xs, self.xs[0].new_zeros(self.xs[0].shape[0], later * self.clt.d_in)], -1
        )
        return self.clt.target(self.clt.run(x)[1], target)
