"""One pass over activations: what a feature report shows, in memory bounded by latents × slots.

:class:`LatentCollector` keeps, per reported latent, its top-k contexts, a uniform sample of its
firing tokens (for the quantile samples), an exact activation histogram and its firing count;
:func:`collect_lm` streams a model's text through the harvesting path (early stop at the hook)
and the SAE, feeding the collector and the reconstruction metrics of every latent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.core.encoding import SparseCode
from saekit.eval.dictionaries import is_multi_hook
from saekit.eval.metrics import EvalResult, MetricAccumulator
from saekit.model.sae import SAE
from saekit.report.topk import ActivationHistogram, Slots


@dataclass
class CollectConfig:
    """How much the report keeps per latent."""

    top_k: int = 20
    """Top-activating contexts per latent."""
    samples: int = 64
    """Uniformly sampled firing tokens per latent (the quantile samples are drawn from them)."""
    left: int = 12
    """Context tokens shown before the selected token."""
    right: int = 4
    """Context tokens shown after it."""
    bins: int = 32
    """Activation histogram bins."""
    seed: int = 0
    """Seed of the uniform sample."""

    def __post_init__(self) -> None:
        for name in ("top_k", "samples", "bins"):
            if getattr(self, name) <= 0:
                raise ValueError(f"report {name} must be positive, got {getattr(self, name)}")
        for name in ("left", "right", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"report {name} must be >= 0, got {getattr(self, name)}")


class LatentCollector:
    """Top-k contexts, a uniform sample of firing tokens, histogram and firing count of the
    latents ``latent_ids``; :meth:`update` takes one batch of [B, T] contexts."""

    def __init__(self, latent_ids: Tensor, cfg: CollectConfig | None = None):
        self.cfg = cfg = cfg or CollectConfig()
        self.latent_ids = latent_ids.long()
        M = int(self.latent_ids.numel())
        self.top = Slots.empty(M, cfg.top_k, cfg.left, cfg.right)
        self.sample = Slots.empty(M, cfg.samples, cfg.left, cfg.right)
        self.histogram = ActivationHistogram(M, cfg.bins)
        self.fired = torch.zeros(M, dtype=torch.int64)
        self.n_tokens = 0
        self.offset = 0
        self._generator = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def update(
        self, z_BTM: Tensor, keep_BT: Tensor, ids_BT: Tensor, aux_BTM: Tensor | None = None
    ) -> None:
        """``z_BTM``: the reported latents' activations on every position of B contexts of T
        tokens; ``keep_BT``: the positions that count (e.g. not BOS); those that do not are shown
        unshaded and never selected. ``ids_BT``: the token ids (-1 where there are none);
        ``aux_BTM``: carried along with each selected token (:attr:`Slots.aux`)."""
        B, T, M = z_BTM.shape
        z_BTM = z_BTM.float()
        if not bool(keep_BT.all()):
            z_BTM = torch.where(keep_BT.unsqueeze(-1), z_BTM, 0.0)
        # candidates: the firing (position, latent) pairs, row-major: ascending key per latent
        flat_n, latent_n = (z_BTM.view(B * T, M) > 0).nonzero(as_tuple=True)
        value_n = z_BTM.view(B * T, M)[flat_n, latent_n]
        self.top.update(value_n, flat_n, latent_n, z_BTM, ids_BT, self.offset, aux_BTM)
        u_n = torch.rand(value_n.numel(), generator=self._generator, dtype=torch.float64)
        self.sample.update(-u_n, flat_n, latent_n, z_BTM, ids_BT, self.offset, aux_BTM)
        self.histogram.update(value_n, latent_n)
        # density counts every z ≠ 0 (AbsTopK's latents are signed); the contexts, samples and
        # histogram above are of the positive activations
        self.fired += (z_BTM.view(B * T, M) != 0).sum(0)
        self.n_tokens += int(keep_BT.sum())
        self.offset += B * T

    def nbytes(self) -> int:
        """Bytes of the collected state: latents × (top_k + samples) × window, whatever the
        number of tokens."""
        hist = self.histogram.counts.numel() * 8 + self.histogram.hi.numel() * 8
        return self.top.nbytes() + self.sample.nbytes() + hist + self.fired.numel() * 8


@dataclass
class Collected:
    """A finished pass: the collector and the metrics of every latent of the SAE."""

    collector: LatentCollector
    metrics: EvalResult


def collect_batches(
    sae: SAE,
    batches: Iterable[tuple[Tensor, ...]],
    latent_ids: Tensor,
    cfg: CollectConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Collected:
    """Stream ``(x_BTd, keep_BT, ids_BT[, aux_BTM])`` batches (aux: see
    :meth:`LatentCollector.update`) through the SAE: reconstruction metrics over
    the kept tokens (every latent) and the collector of ``latent_ids``. ``on_batch(n)`` is
    called with each batch's kept-token count (a progress bar)."""
    multi = is_multi_hook(sae)
    width = sae.cfg.target_width if multi else sae.cfg.d_in
    acc = MetricAccumulator(width, sae.cfg.n_latents, device=sae.b_dec.device)
    sae.eval()  # inference, as saekit eval: BatchTopK applies its threshold
    collector = LatentCollector(latent_ids, cfg)
    with torch.no_grad():
        for x_BTd, keep_BT, ids_BT, *aux in batches:
            B, T, d = x_BTd.shape
            keep_N = keep_BT.reshape(-1)
            every = bool(keep_N.all())
            x_Nd = x_BTd.reshape(B * T, d).to(sae.b_dec.device, sae.b_dec.dtype)
            if not every:  # the kept tokens only: the others are never selected nor shaded
                x_Nd = x_Nd[keep_N.to(x_Nd.device)]
            # a CLT's or crosscoder's row is its stream (stream_hooks): inputs, then targets
            x_in, target = sae.split_stream(x_Nd) if multi else (x_Nd, None)
            out = sae(x_in)
            acc.add(x_in if target is None else target, out.x_hat, out.latents)
            z_kM = latent_columns(out.latents, collector.latent_ids).cpu().float()
            if every:
                z_BTM = z_kM
            else:
                z_BTM = z_kM.new_zeros(B * T, z_kM.shape[1])
                z_BTM[keep_N.cpu()] = z_kM
            collector.update(z_BTM.view(B, T, -1), keep_BT.cpu(), ids_BT.cpu(), *aux)
            if on_batch is not None:
                on_batch(x_Nd.shape[0])
    if int(acc.n) == 0:
        raise ValueError("no tokens reached the report (empty text, or every token filtered)")
    return Collected(collector, acc.result())


def latent_columns(latents: Tensor | SparseCode, latent_ids: Tensor) -> Tensor:
    """[N, len(latent_ids)]: the reported latents' activations, without densifying all
    d_sae columns of a sparse code."""
    if not isinstance(latents, SparseCode):
        return latents[:, latent_ids.to(latents.device)]
    column_M = torch.full((latents.d_sae,), -1, dtype=torch.int64, device=latents.values.device)
    column_M[latent_ids.to(column_M.device)] = torch.arange(len(latent_ids), device=column_M.device)
    column_n = column_M[latents.latent]
    reported = column_n >= 0
    out = latents.values.new_zeros(latents.n_tokens, len(latent_ids))
    # a code holds each (token, latent) once: a plain scatter, no accumulation
    out[latents.token[reported], column_n[reported]] = latents.values[reported]
    return out


PREFETCH = 2
"""Batches the model runs ahead of the SAE and the collector, in a worker thread (as ``saekit
cache`` harvests: saekit.data.lm.harvest)."""


def lm_batches(
    setup: Any, contexts: Iterable[Any], also: tuple[str, ...] = ()
) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
    """``(x_BTd, keep_BT, ids_BT)`` from packed contexts: activations at the set-up's hook (and
    the hooks ``also``, side by side: a multi-hook dictionary's stream) on every position (the
    harvester keeps them all so windows can be shaded; the set-up's token filter decides which
    count), the forward stopped at the last hook."""
    from saekit.data.lm.harvester import HookPoint, TokenFilter, prefetched, unpack_batch

    harvester = setup.harvester(
        *also, token_filter=TokenFilter(exclude_padding=False, exclude_bos=False)
    )
    names = [setup.hook, *(str(HookPoint.parse(h)) for h in also)]

    def forward(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        ids_BT, mask_BT = unpack_batch(batch)
        acts = harvester(ids_BT, mask_BT)
        x_Nd = acts[setup.hook] if not also else torch.cat([acts[n] for n in names], -1)
        keep_BT = setup.token_filter.mask(ids_BT, mask_BT)
        return x_Nd.view(*ids_BT.shape, -1), keep_BT, ids_BT

    forwards = (forward(batch) for batch in contexts)
    yield from forwards if PREFETCH <= 0 else prefetched(forwards, PREFETCH)
