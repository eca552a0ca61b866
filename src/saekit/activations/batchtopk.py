"""BatchTopK (Bussmann et al. 2024): the k·N largest of ReLU(pre) over the whole batch in
training; a global threshold θ at inference, ``z = pre·1[pre > θ]``.

θ is an EMA of the smallest positive kept activation of each training batch: the first update
sets θ = m, then θ ← βθ + (1−β)m (:meth:`BatchTopK.after_step`; under data parallelism m is the
minimum over ranks). Saved with the SAE; exports as JumpReLU with every threshold = θ.
Training paths as for TopK (``kernel``), selection :func:`saekit.kernels.batchtopk_select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.activations.base import (
    Activation,
    ActivationConfig,
    ExportForm,
    JumpReLUForm,
)
from saekit.activations.jumprelu import JumpReLUConfig, imported_threshold, jumprelu_export
from saekit.activations.topk import check_k, fast_preacts
from saekit.core.encoding import EncoderView, Encoding, Preacts, SparseCode
from saekit.kernels import select
from saekit.kernels.layout import CodeLayout
from saekit.kernels.select import batchtopk_select
from saekit.kernels.sharded_select import chosen_overall
from saekit.objective import matryoshka

if TYPE_CHECKING:
    from saekit.core.comm import Comm
    from saekit.core.shard import LatentShard

FLOOR_MARGIN = 0.1
"""The next CPU selection looks above the previous k·N-th value minus 10% of its size."""


@dataclass
class BatchTopKConfig(ActivationConfig):
    kind = "batchtopk"
    k: int
    """Active latents per token on average over a training batch."""
    threshold_beta: float = 0.999
    """EMA coefficient β of the inference threshold θ."""
    kernel: str = "torch"
    """torch, triton or reference, as for topk."""

    def __post_init__(self) -> None:
        check_k(self.k, self.kernel)
        if not 0.0 <= self.threshold_beta < 1.0:  # also refuses nan
            raise ValueError(f"threshold_beta must be in [0, 1), got {self.threshold_beta!r}")

    def check_d_sae(self, d_sae: int) -> None:
        if self.k > d_sae:
            raise ValueError(f"activation.k = {self.k} exceeds d_sae = {d_sae}")

    def name_parts(self) -> list[str]:
        return [self.kind, f"k{self.k}"]

    def inference_l0_target(self, penalty_target: float | None) -> float | None:
        """k: the calibrated θ aims at k latents per token on average."""
        return float(self.k)

    @classmethod
    def from_export(cls, form: ExportForm) -> BatchTopKConfig:
        return cls(k=form.k)


def batch_min_positive(latents: Tensor | SparseCode) -> Tensor:
    """m: the smallest positive latent of a batch (inf if none is), detached, 0-d."""
    values = (latents.values if isinstance(latents, SparseCode) else latents).detach()
    return torch.where(values > 0, values, torch.full_like(values, math.inf)).min()


class BatchTopK(Activation):
    config_class = BatchTopKConfig
    unit_norm_decoder = True
    revival_signals = frozenset({"auxk", "preact"})
    calibrated_threshold = True

    def __init__(self, cfg: BatchTopKConfig, d_sae: int, groups: int = 1):
        super().__init__(cfg, d_sae, groups)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        if not self.training or self.cfg.kernel == "reference":
            return self.encode_preacts(self.preacts(view, x_n_ND))
        return self.encode_preacts(fast_preacts(view, x_n_ND, self))

    def encode_preacts(self, pre: Preacts) -> Encoding:
        """Across all latents (a cross-layer transcoder's: every layer's at once): the k·N
        largest of the batch in training, pre·1[pre > θ] outside it."""
        if not self.training:
            pre_NM = pre.dense()
            return Encoding(pre_NM * (pre_NM > self.threshold).to(pre_NM.dtype), pre)
        k = self.cfg.k
        if self.cfg.kernel == "reference":
            values_E, flat_E = batchtopk_select(pre.dense(), k)
            z_flat = torch.zeros_like(pre.dense()).reshape(-1)
            z_NM = z_flat.scatter(0, flat_E, torch.relu(values_E)).view_as(pre.dense())
            return Encoding(z_NM, pre)
        n_tokens, d_sae = pre.detached.shape
        values_E, flat_E = batchtopk_select(pre.detached, k, floor=self._selection_floor())
        self._last_kept_min = values_E.min() if values_E.numel() else None
        token_E = torch.div(flat_E, d_sae, rounding_mode="floor")
        layout = CodeLayout(
            token_E, flat_E - token_E * d_sae, n_tokens, d_sae, backend=self.cfg.kernel
        )
        values_E = torch.relu(pre.selected(values_E, layout))
        return Encoding(SparseCode(values_E, layout.latent, token_E, n_tokens, d_sae, layout), pre)

    def encode_sharded(self, view: EncoderView, x_n_ND: Tensor, shard: LatentShard) -> Encoding:
        """``encode_preacts_sharded`` of the affine encoder's pre-activations."""
        if not self.training:
            return self.encode(view, x_n_ND)
        reference = self.cfg.kernel == "reference"
        pre = self.preacts(view, x_n_ND) if reference else fast_preacts(view, x_n_ND, self)
        return self.encode_preacts_sharded(pre, shard)

    def encode_preacts_sharded(self, pre: Preacts, shard: LatentShard) -> Encoding:
        """Training: the k·N largest over the WHOLE batch (every data group's tokens, every
        part's latents, a CLT's of every layer: N = all ranks' tokens), exact against one
        process on that batch. Each part proposes its own k·N largest (all its entries if
        fewer), the largest k·N of every proposal are kept (kernels.sharded_select); the code
        holds this part's proposals, those not kept at an exact 0. Inference: the threshold,
        per latent."""
        if not self.training:
            return self.encode_preacts(pre)
        n_tokens, d_sae = pre.detached.shape
        n_keep = self.cfg.k * n_tokens * (shard.world.world_size // shard.count)
        device = pre.detached.device
        if n_keep < n_tokens * d_sae:  # the k·N largest here, sorted by flat index
            values_E, flat_E = batchtopk_select(pre.detached, n_keep // n_tokens)
        else:  # the part holds fewer entries than are kept: all are candidates
            flat_E = torch.arange(n_tokens * d_sae, device=device)
            values_E = pre.detached.reshape(-1)
        kept_E = chosen_overall(values_E, n_keep, shard.world, "BatchTopK candidates")
        if self.cfg.kernel == "reference":
            z_flat = torch.zeros_like(pre.dense()).reshape(-1)
            dense_E = pre.dense().reshape(-1).index_select(0, flat_E)
            z_E = torch.where(kept_E, torch.relu(dense_E), torch.zeros_like(dense_E))
            return Encoding(z_flat.scatter(0, flat_E, z_E).view_as(pre.dense()), pre)
        token_E = torch.div(flat_E, d_sae, rounding_mode="floor")
        layout = CodeLayout(
            token_E, flat_E - token_E * d_sae, n_tokens, d_sae, backend=self.cfg.kernel
        )
        values_E = torch.relu(pre.selected(values_E, layout))
        values_E = torch.where(kept_E, values_E, torch.zeros_like(values_E))
        return Encoding(SparseCode(values_E, layout.latent, token_E, n_tokens, d_sae, layout), pre)

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        """Outside training only: θ is per latent there; the training selection spans every
        group's latents."""
        if self.training:
            raise ValueError(
                "BatchTopK selects across every latent group in training: encode one group only"
                " at inference (eval mode)"
            )
        return self.encode_preacts(pre)

    def level_code(self, latents: Tensor | SparseCode, end: int, k: int) -> Tensor | SparseCode:
        """The k·N largest entries below ``end`` of the whole batch (its selection's rule)."""
        return matryoshka.level_code(latents, end, k, per_token=False)

    _last_kept_min: Tensor | None = None
    """The previous training batch's k·N-th pre-activation (not saved: a hint for the next
    selection's cost, never for what it selects)."""

    def _selection_floor(self) -> float | None:
        """10% (of its size) under the previous batch's k·N-th value, on CPU; None otherwise.
        The k·N-th largest of N·M values moves little from one batch to the next."""
        last = self._last_kept_min
        if last is None or not select.reads_free(last) or not torch.isfinite(last):
            return None
        last = float(last)
        return last - FLOOR_MARGIN * abs(last)

    def as_jumprelu(self) -> JumpReLUForm:
        """The inference z = pre·H(pre − θ) is a JumpReLU with every θ_i = θ (the one home of
        this conversion: ``saekit convert`` and the export; saekit.eval.calibrate: why θ stays
        global). Metadata records the source and sets ``target_l0`` = k, so the L0 check of
        ``saekit eval`` applies."""
        theta, k = float(self.threshold), self.cfg.k
        config = JumpReLUConfig(init_threshold=theta) if theta > 0 else JumpReLUConfig()
        thresholds = torch.full((self.d_sae,), theta, dtype=self.threshold.dtype)
        source = {"kind": self.cfg.kind, "k": k, "threshold": theta}
        return JumpReLUForm(config, thresholds, {"converted_from": source, "target_l0": float(k)})

    def export_form(self) -> ExportForm:
        """As the JumpReLU of :meth:`as_jumprelu` (dictionary_learning's own BatchTopK form
        is read, never written)."""
        return jumprelu_export(self.as_jumprelu().threshold)

    @torch.no_grad()
    def load_export(self, form: ExportForm) -> None:
        self.threshold.copy_(imported_threshold("batchtopk", form.threshold, ()))
        self.threshold_initialized.fill_(True)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """The batch's smallest positive kept value, 0-d (0 if none is positive)."""
        theta = batch_min_positive(enc.latents)
        return torch.where(torch.isfinite(theta), theta, torch.zeros_like(theta))

    def firing_threshold_sharded(self, enc: Encoding, shard: LatentShard) -> Tensor:
        """The whole batch's smallest positive kept value (every part's, every data group's:
        one MIN over the world, as ``after_step``'s), 0-d (0 if none is positive)."""
        local = batch_min_positive(enc.latents)
        theta = shard.world.all_reduce(local, "min", "BatchTopK firing threshold")
        return torch.where(torch.isfinite(theta), theta, torch.zeros_like(theta))

    @torch.no_grad()
    def after_step(self, enc: Encoding, comm: Comm) -> None:
        if self.training:
            batch_min = batch_min_positive(enc.latents)  # over ranks: the MIN of theirs
            self.update_threshold(comm.all_reduce(batch_min, "min", "BatchTopK batch min"))

    @torch.no_grad()
    def update_threshold(self, batch_min: Tensor) -> None:
        """One EMA step toward ``batch_min`` (a 0-d tensor); skipped when it is inf. No sync."""
        batch_min = batch_min.to(self.threshold.dtype)
        beta = self.cfg.threshold_beta
        ema = torch.where(
            self.threshold_initialized, beta * self.threshold + (1 - beta) * batch_min, batch_min
        )
        finite = torch.isfinite(batch_min)
        self.threshold.copy_(torch.where(finite, ema, self.threshold))
        self.threshold_initialized.copy_(self.threshold_initialized | finite)
