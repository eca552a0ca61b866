"""HierarchicalTopK (Balagansky et al. 2025, arXiv 2505.24473): one SAE trained for every
sparsity k' ≤ K at once. Encode is TopK's with k = K; the reconstruction term averages over
every prefix of each token's latents sorted by value:

    v_(1) ≥ … ≥ v_(K) the kept ReLU values of token n, W_(j) their decoder rows
    x̂_{k'} = b_dec + Σ_{j ≤ k'} v_(j) W_(j)        L_rec = (1/K) Σ_{k'=1..K} mean_n ‖x_n − x̂_{k'}‖²

From the sparse code alone: the contribution of rank j, δ_j = v_(j) W_(j), is one sparse decode
into [K, N, d] (bags = rank × token) and the K prefix errors are running sums over those
blocks (:func:`saekit.kernels.prefix.prefix_mse`, the Matryoshka loss's); never a dense [N, M]
tensor on the fast path. Memory: the [K, N, d] blocks and their gradient.

After training the SAE encodes with any k' ≤ K: ``inference_k`` (saved in cfg.json;
:meth:`HierarchicalTopK.set_inference_k` changes it on a loaded SAE) keeps the k' largest
outside training, i.e. exactly the k'-prefix the loss trained. Revival as for TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.activations.base import ExportForm
from saekit.activations.topk import TopK, TopKConfig
from saekit.core.encoding import EncoderView, SparseCode
from saekit.kernels.layout import CodeLayout
from saekit.kernels.prefix import prefix_mse
from saekit.kernels.sparse import sparse_decode

if TYPE_CHECKING:
    from saekit.core.encoding import ForwardOutput
    from saekit.core.shard import LatentShard


def check_inference_k(inference_k: int | None, k: int) -> None:
    if inference_k is None:
        return
    if not isinstance(inference_k, int) or isinstance(inference_k, bool) or inference_k <= 0:
        raise ValueError(f"inference_k must be a positive integer or null, got {inference_k!r}")
    if inference_k > k:
        raise ValueError(f"inference_k = {inference_k} exceeds k = {k} (the trained prefixes)")


@dataclass
class HierarchicalTopKConfig(TopKConfig):
    kind = "hierarchical_topk"
    inference_k: int | None = None
    """k' ≤ k latents per token outside training (null: k)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_inference_k(self.inference_k, self.k)

    def name_parts(self) -> list[str]:
        return ["htopk", f"k{self.k}"]


def sorted_code(latents: Tensor | SparseCode, k: int) -> tuple[Tensor, Tensor]:
    """Each token's k kept values sorted descending, and their latents: [N, k] each."""
    if isinstance(latents, SparseCode):  # k entries per token, token-major
        values_Nk, latent_Nk = latents.values.view(-1, k), latents.latent.view(-1, k)
    else:  # dense: the kept values are the k largest (all ≥ 0; a kept 0 contributes nothing)
        values_Nk, latent_Nk = latents.topk(k, dim=-1)
    order_Nk = values_Nk.detach().argsort(-1, descending=True)
    return values_Nk.gather(1, order_Nk), latent_Nk.gather(1, order_Nk)


class HierarchicalTopK(TopK):
    config_class = HierarchicalTopKConfig

    def encode_k(self) -> int:
        if self.training or self.cfg.inference_k is None:
            return self.cfg.k
        return self.cfg.inference_k

    def export_form(self) -> ExportForm:
        """Its inference is TopK's with k = inference_k (default K)."""
        return ExportForm("topk", k=self.cfg.inference_k or self.cfg.k)

    def set_inference_k(self, inference_k: int | None) -> None:
        """Encode with k' ≤ k from now on (saved with the SAE); None: k."""
        check_inference_k(inference_k, self.cfg.k)
        self.cfg.inference_k = inference_k

    def reconstruction_loss(self, view: EncoderView, out: ForwardOutput) -> Tensor:
        """(1/K) Σ_{k'} mean_n ‖x_n − x̂_{k'}‖² over the K prefixes of the sorted code."""
        k = self.cfg.k
        values_Nk, latent_Nk = sorted_code(out.latents, k)
        n_tokens, d_sae = values_Nk.shape[0], self.d_sae
        # Rank-major order: bag j·N + n holds token n's j-th largest entry (one entry per bag).
        values_E, latent_E = values_Nk.T.reshape(-1), latent_Nk.T.reshape(-1)
        bag_E = torch.arange(k * n_tokens, device=latent_E.device)
        backend = "triton" if self.cfg.kernel == "triton" else "torch"
        layout = CodeLayout(bag_E, latent_E, k * n_tokens, d_sae, bag_E, backend)
        delta_E_D = sparse_decode(values_E, latent_E, bag_E, view.W_dec, k * n_tokens, layout)
        delta_kND = delta_E_D.view(k, n_tokens, -1)
        # a transcoder predicts its target from b_dec plus its skip path (SAE: x_n from b_dec)
        return prefix_mse(delta_kND, out.target() - view.decoder_offset_n(out.x_n)).mean()

    def reconstruction_blocks(
        self, view: EncoderView, latents: Tensor | SparseCode, shard: LatentShard
    ) -> Tensor:
        """This part's share of the K rank blocks [K, N, d_out]: each of its kept entries goes
        to the block of its rank among the token's K kept values of EVERY part (one all-gather
        of [N, K] values). Entries not kept (or a kept 0) contribute nothing wherever they go."""
        k = self.cfg.k
        if isinstance(latents, SparseCode):  # k entries per token, token-major
            values_Nk, latent_Nk = latents.values.view(-1, k), latents.latent.view(-1, k)
        else:
            values_Nk, latent_Nk = latents.topk(k, dim=-1)
        positive_Nk = values_Nk.detach()
        positive_Nk = torch.where(positive_Nk > 0, positive_Nk, torch.full_like(positive_Nk, -1.0))
        every_TNk = shard.comm.all_gather(positive_Nk, "HierarchicalTopK kept values")
        n_tokens = values_Nk.shape[0]
        ranked = (-every_TNk.permute(1, 0, 2).reshape(n_tokens, -1)).sort(-1).values  # ascending
        rank_Nk = torch.searchsorted(ranked, -positive_Nk.contiguous())  # values above it
        rank_Nk = torch.where(positive_Nk > 0, rank_Nk, torch.full_like(rank_Nk, k - 1))
        tokens_N1 = torch.arange(n_tokens, device=rank_Nk.device).unsqueeze(1)
        bag_E, order = (rank_Nk * n_tokens + tokens_N1).reshape(-1).sort()
        latent_E = latent_Nk.reshape(-1)[order]
        backend = "triton" if self.cfg.kernel == "triton" else "torch"
        layout = CodeLayout(bag_E, latent_E, k * n_tokens, self.d_sae, backend=backend)
        values_E = values_Nk.reshape(-1)[order]
        delta = sparse_decode(values_E, latent_E, bag_E, view.W_dec, k * n_tokens, layout)
        return delta.view(k, n_tokens, -1)
