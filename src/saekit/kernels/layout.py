"""Index structures of a sparse code, shared by the decode and the encoder backward."""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("torch", "triton")


class CodeLayout:
    """Index structures of one code (token non-decreasing), built lazily and shared.

    ``token_offsets [N]``: start of each token's entries (embedding_bag offsets, CSR crow_indices
    without the last). ``order [nnz]``: a stable permutation sorting entries by latent;
    ``token_by_latent [nnz]`` = token[order]; ``latent_offsets [M]``: start of each latent's
    entries in that order. Only the backward needs the by-latent half. ``backend``: "torch"
    (embedding_bag, CPU and GPU) or "triton" (saekit.kernels.triton_kernels, CUDA only).
    ``per_group`` (:meth:`fixed_k` with groups): each token's entries are ``groups`` runs of
    ``per_group``, run g holding latents of group g (a cross-layer transcoder's TopK per layer),
    so a code's entries of one group are known without reading it.
    """

    def __init__(
        self,
        token: Tensor,
        latent: Tensor,
        n_tokens: int,
        d_sae: int,
        token_offsets: Tensor | None = None,
        backend: str = "torch",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.token, self.latent = token, latent
        self.n_tokens, self.d_sae = n_tokens, d_sae
        self._token_offsets = token_offsets
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None
        self.per_token: int | None = None  # k when every token has k entries (fixed_k)
        self.groups, self.per_group = 1, None  # fixed_k's k/G per group, in group order

    @classmethod
    def fixed_k(
        cls, latent_Nk: Tensor, d_sae: int, backend: str = "torch", groups: int = 1
    ) -> CodeLayout:
        """k entries per token in token order (TopK, AuxK): offsets are n·k, no search needed.
        ``groups`` G > 1: each token's k are G runs of k/G, run g from latent group g (the d_sae/G
        latents g·d_sae/G …; TopK per group, saekit.activations.topk.grouped_select)."""
        n_tokens, k = latent_Nk.shape
        if k % groups or d_sae % groups:
            raise ValueError(f"{groups} latent groups must divide both k = {k} and d_sae = {d_sae}")
        offsets_N = torch.arange(0, n_tokens * k, k, device=latent_Nk.device)
        token_E = torch.arange(n_tokens, device=latent_Nk.device).repeat_interleave(k)
        layout = cls(token_E, latent_Nk.reshape(-1), n_tokens, d_sae, offsets_N, backend)
        layout.per_token = k
        if groups > 1:
            layout.groups, layout.per_group = groups, k // groups
        return layout

    @property
    def token_offsets(self) -> Tensor:
        if self._token_offsets is None:
            bounds_N = torch.arange(self.n_tokens, device=self.token.device)
            self._token_offsets = torch.searchsorted(self.token, bounds_N)
        return self._token_offsets

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, token_by_latent, latent_offsets)."""
        if self._by_latent is None:
            # int32 keys sort about twice as fast as int64 on CPU (M < 2^31 always).
            sorted_latent, order = torch.sort(self.latent.to(torch.int32), stable=True)
            bounds_M = torch.arange(self.d_sae, device=self.latent.device)
            latent_offsets = torch.searchsorted(sorted_latent, bounds_M.to(torch.int32))
            if self.per_token:  # entry e belongs to token e // k: no gather needed
                token_by_latent = torch.div(order, self.per_token, rounding_mode="floor")
            else:  # index_select: ~2× faster than advanced indexing on CPU
                token_by_latent = self.token.index_select(0, order)
            self._by_latent = (order, token_by_latent, latent_offsets)
        return self._by_latent
