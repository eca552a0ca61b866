"""TopK (Gao et al. 2024): keep the k largest of ReLU(pre) per token.

Two paths with the same selection (:func:`saekit.kernels.topk_select`):
- ``kernel: torch`` (or ``triton``): one encoder matmul without autograd, then everything is
  O(N·k·d) — a SparseCode, the sparse decode, the encoder's sparse backward.
- ``kernel: reference``: dense autograd through the encoder and dense [N, M] latents, as the
  formula reads; the fast path is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.activations.base import Activation, ActivationConfig, ExportForm
from saekit.core.encoding import EncoderView, Encoding, Preacts, SparseCode
from saekit.kernels.layout import CodeLayout
from saekit.kernels.select import topk_select
from saekit.kernels.sharded_select import chosen_per_row, kth_per_row
from saekit.kernels.sparse import SparsePreacts
from saekit.kernels.workspace import free_buffer
from saekit.objective import matryoshka

if TYPE_CHECKING:
    from saekit.core.shard import LatentShard

KERNELS = ("torch", "triton", "reference")


def check_k(k: int, kernel: str) -> None:
    """Shared by the TopK family's configs."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


@dataclass
class TopKConfig(ActivationConfig):
    kind = "topk"
    k: int
    """Active latents per token."""
    kernel: str = "torch"
    """torch (sparse fast path), triton (the same with Triton kernels, CUDA only) or reference
    (dense autograd). Same numbers up to float rounding."""

    def __post_init__(self) -> None:
        check_k(self.k, self.kernel)

    def check_d_sae(self, d_sae: int) -> None:
        if self.k > d_sae:
            raise ValueError(f"activation.k = {self.k} exceeds d_sae = {d_sae}")

    def name_parts(self) -> list[str]:
        return [self.kind, f"k{self.k}"]

    def inference_l0_target(self, penalty_target: float | None) -> float | None:
        """None: the inference keeps exactly k latents per token by construction."""
        return None

    @classmethod
    def from_export(cls, form: ExportForm) -> TopKConfig:
        return cls(k=form.k)


def fast_preacts(view: EncoderView, x_n_ND: Tensor, owner: object) -> SparsePreacts:
    """The fast path's pre, computed into ``owner``'s (the activation's, so one per SAE) own
    [N, M] buffer on CPU when nothing else holds it (kernels/workspace.py: no page faults for a
    fresh 128 MiB every step)."""
    out, dtype = None, view.W_enc.dtype
    inputs = (x_n_ND, view.b_enc, view.input_center)
    if x_n_ND.device.type == "cpu" and all(t is None or t.dtype == dtype for t in inputs):
        out = free_buffer(owner, x_n_ND.shape[0], view.W_enc.shape[0], dtype)
    return SparsePreacts(x_n_ND, view.W_enc, view.b_enc, view.input_center, out=out)


def grouped_select(
    pre_NM: Tensor, k: int, groups: int, select=topk_select
) -> tuple[Tensor, Tensor]:
    """``select`` (k per row) on each token's ``groups`` equal groups of latents: (values
    [N, G·k], latent [N, G·k]), token by token, group by group within a token (a cross-layer
    transcoder's k per layer; G = 1: the plain selection)."""
    n_tokens, d_sae = pre_NM.shape
    if groups == 1:
        return select(pre_NM, k)
    width = d_sae // groups
    values_Rk, latent_Rk = select(pre_NM.reshape(n_tokens * groups, width), k)
    start_R = torch.arange(groups, device=pre_NM.device).repeat(n_tokens) * width
    latent_Rk = latent_Rk + start_R.unsqueeze(1)
    return values_Rk.reshape(n_tokens, -1), latent_Rk.reshape(n_tokens, -1)


def per_group_threshold(min_NG: Tensor, d_sae: int) -> Tensor:
    """A per-(token, group) threshold [N, G] as pre broadcasts it: [N, 1] for one group, else
    each group's value repeated over its latents [N, M]."""
    groups = min_NG.shape[1]
    return min_NG if groups == 1 else min_NG.repeat_interleave(d_sae // groups, dim=1)


class TopK(Activation):
    config_class = TopKConfig
    unit_norm_decoder = True
    revival_signals = frozenset({"auxk", "preact"})

    def encode_k(self) -> int:
        """Latents kept per token by ``encode`` (HierarchicalTopK: fewer outside training)."""
        return self.cfg.k

    def select(self, pre_NM: Tensor, k: int, groups: int | None = None) -> tuple[Tensor, Tensor]:
        """Each token's (and group's) k kept entries: (values [N, G·k], latent [N, G·k]);
        ``groups``: G, else the activation's own."""
        return grouped_select(pre_NM, k, self.groups if groups is None else groups)

    def kept(self, values: Tensor) -> Tensor:
        """A kept entry's latent value: ReLU (AbsTopK: the signed pre itself)."""
        return torch.relu(values)

    def encode(self, view: EncoderView, x_n_ND: Tensor) -> Encoding:
        if self.cfg.kernel == "reference":
            return self.encode_preacts(self.preacts(view, x_n_ND))
        return self.encode_preacts(fast_preacts(view, x_n_ND, self))

    def encode_preacts(self, pre: Preacts) -> Encoding:
        """``reference``: dense latents through dense autograd; otherwise a SparseCode whose
        values carry the encoder's sparse backward (``pre.selected``)."""
        return self._encode(pre, self.groups)

    def encode_group(self, pre: Preacts, group: int) -> Encoding:
        """k per token among the group's latents: what :meth:`encode_preacts` keeps there."""
        return self._encode(pre, 1)

    def _encode(self, pre: Preacts, groups: int) -> Encoding:
        k = self.encode_k()
        if self.cfg.kernel == "reference":
            values_Nk, latent_Nk = self.select(pre.dense(), k, groups)
            z_NM = torch.zeros_like(pre.dense()).scatter(1, latent_Nk, self.kept(values_Nk))
            return Encoding(z_NM, pre)
        n_tokens, d_sae = pre.detached.shape
        values_Nk, latent_Nk = self.select(pre.detached, k, groups)
        # groups > 1: the layout says so, and a cross-layer decode cuts the code by layer
        # without reading it (saekit.kernels.layered)
        layout = CodeLayout.fixed_k(latent_Nk, d_sae, self.cfg.kernel, groups)
        values_E = self.kept(pre.selected(values_Nk.reshape(-1), layout))
        code = SparseCode(values_E, layout.latent, layout.token, n_tokens, d_sae, layout)
        return Encoding(code, pre)

    def encode_sharded(self, view: EncoderView, x_n_ND: Tensor, shard: LatentShard) -> Encoding:
        """``encode_preacts_sharded`` of the affine encoder's pre-activations."""
        reference = self.cfg.kernel == "reference"
        pre = self.preacts(view, x_n_ND) if reference else fast_preacts(view, x_n_ND, self)
        return self.encode_preacts_sharded(pre, shard)

    def encode_preacts_sharded(self, pre: Preacts, shard: LatentShard) -> Encoding:
        """Each part's own top-k per token and group (a CLT's layer) are the candidates; the k
        largest of the T·k of each (token, group) are kept (kernels.sharded_select, one
        all-gather of [N, G·k]). The code holds this part's G·k candidates per token, those not
        kept at an exact 0 (a fixed shape: no host sync)."""
        k = self.encode_k()
        n_tokens, d_sae = pre.detached.shape
        values_Nk, latent_Nk = grouped_select(pre.detached, k, self.groups)
        rows = values_Nk.reshape(-1, k)  # one row per (token, group)
        kept_Nk = chosen_per_row(rows, k, shard.comm, "TopK candidates").reshape_as(values_Nk)
        if self.cfg.kernel == "reference":
            z_Nk = torch.relu(pre.dense().gather(1, latent_Nk))
            z_Nk = torch.where(kept_Nk, z_Nk, torch.zeros_like(z_Nk))
            return Encoding(torch.zeros_like(pre.dense()).scatter(1, latent_Nk, z_Nk), pre)
        layout = CodeLayout.fixed_k(latent_Nk, d_sae, self.cfg.kernel)
        values_E = torch.relu(pre.selected(values_Nk.reshape(-1), layout))
        values_E = torch.where(kept_Nk.reshape(-1), values_E, torch.zeros_like(values_E))
        code = SparseCode(values_E, layout.latent, layout.token, n_tokens, d_sae, layout)
        return Encoding(code, pre)

    def level_code(self, latents: Tensor | SparseCode, end: int, k: int) -> Tensor | SparseCode:
        """Each token's k largest |z| below ``end`` (AbsTopK: signed values, by magnitude)."""
        return matryoshka.level_code(latents, end, k, per_token=True)

    def export_form(self) -> ExportForm:
        return ExportForm("topk", k=self.cfg.k)

    def firing_threshold(self, enc: Encoding) -> Tensor:
        """Each token's (and group's) smallest kept value, ReLU'd: [N, 1] (a CLT's: [N, M]); 0
        where a kept entry is ≤ 0."""
        values_Nk, _ = self.select(enc.preacts.detached, self.cfg.k)
        min_NG = values_Nk.reshape(values_Nk.shape[0], self.groups, -1).min(-1).values
        return per_group_threshold(torch.relu(min_NG), self.d_sae)

    def firing_threshold_sharded(self, enc: Encoding, shard: LatentShard) -> Tensor:
        """``firing_threshold`` of the whole dictionary: each (token, group)'s k-th largest pre
        of every part (the smallest kept), ReLU'd: this part's k candidates per (token, group)
        gathered once more (kernels.sharded_select, one all-gather of [N, G·k])."""
        k = self.cfg.k
        values_Nk, _ = grouped_select(enc.preacts.detached, k, self.groups)
        kth_R = kth_per_row(values_Nk.reshape(-1, k), k, shard.comm, "TopK firing threshold")
        return per_group_threshold(torch.relu(kth_R.view(values_Nk.shape[0], -1)), self.d_sae)
