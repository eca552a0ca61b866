"""Torch fast paths for the TopK family, each with a plain reference beside it.

After the one dense encoder matmul, everything in a TopK step is O(nnz·d) (nnz = N·k):

- decode ``x̂[n] = Σ_{e: token_e = n} v_e · W_dec[latent_e]`` and its backward;
- the encoder backward: ``v_e = x_c[token_e]·W_enc[latent_e] + b_enc[latent_e]`` is computed
  once by the dense matmul WITHOUT autograd; the gradient ``g_e`` reaches W_enc, b_enc and the
  input through sparse products only, never through a dense [N, M] gradient.

No [N, M] gradient and no [nnz, d] buffer is built. Every sparse product is one of two
primitives: a "weighted bag of rows", which ``F.embedding_bag`` computes in one pass (FBGEMM on
CPU), or a row-pair dot product, which aten's embedding-bag per-sample-weight gradient computes:

    bag sum  out[b] = Σ_{e in bag b} w_e · W[row_e]      decode, dx_c (bags = tokens),
                                                           dW_dec, dW_enc (bags = latents)
    row dot  out[e] = A[token_e] · B[latent_e]           grad of values, pre at coordinates

Bags by latent need the entries sorted by latent; :class:`CodeLayout` builds that permutation
once per code (an argsort of nnz ints) and shares it between the decode and the encoder
backward. Nothing here syncs with the host (no ``.item()``, no boolean indexing), so a step can
be captured in a CUDA graph. Measured on CPU against CSR @ dense (``torch.sparse_csr_tensor``)
and index_add: benchmarks/README.md.

Also here: the fused selections (TopK, BatchTopK with an optional candidate path, AuxK with an
optional dense-over-gathered-columns path) and :func:`fast_forward`, the path ``SAE.forward``
takes for the TopK family in training (``SAEConfig.kernel``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.activations import SparseCode

BACKENDS = ("torch", "triton")

# --------------------------------------------------------------------------------------------
# Index structures


class CodeLayout:
    """Index structures of one code (token non-decreasing), built lazily and shared.

    ``token_offsets [N]``: start of each token's entries (embedding_bag offsets, CSR crow_indices
    without the last). ``order [nnz]``: a stable permutation sorting entries by latent;
    ``token_by_latent [nnz]`` = token[order]; ``latent_offsets [M]``: start of each latent's
    entries in that order. Only the backward needs the by-latent half. ``backend``: "torch"
    (embedding_bag, CPU and GPU) or "triton" (saekit.kernels.triton_kernels, CUDA only).
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
        self.exact: Tensor | None = None  # BatchTopK candidate path: see batchtopk_select

    @classmethod
    def fixed_k(cls, latent_Nk: Tensor, d_sae: int, backend: str = "torch") -> CodeLayout:
        """k entries per token in token order (TopK, AuxK): offsets are n·k, no search needed."""
        n_tokens, k = latent_Nk.shape
        offsets_N = torch.arange(0, n_tokens * k, k, device=latent_Nk.device)
        token_E = torch.arange(n_tokens, device=latent_Nk.device).repeat_interleave(k)
        return cls(token_E, latent_Nk.reshape(-1), n_tokens, d_sae, offsets_N, backend)

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
            self._by_latent = (order, self.token[order], latent_offsets)
        return self._by_latent


def bag_sum(
    weights_E: Tensor, rows_E: Tensor, offsets_B: Tensor, W_RD: Tensor, backend: str = "torch"
) -> Tensor:
    """out[b] = Σ_{e in bag b} w_e · W[row_e]; bag b is entries [offsets[b], offsets[b+1]).

    Not differentiable by itself (the autograd functions below call it in their forward and
    backward); detached inputs select embedding_bag's forward-only kernel.
    """
    if backend == "triton" and W_RD.is_cuda:
        from saekit.kernels import triton_kernels

        return triton_kernels.bag_sum(weights_E.detach(), rows_E, offsets_B, W_RD.detach())
    with torch.autocast(W_RD.device.type, enabled=False):  # a gather: no lower precision
        return F.embedding_bag(
            rows_E,
            W_RD.detach(),
            offsets_B,
            mode="sum",
            per_sample_weights=weights_E.detach().to(W_RD.dtype),
        )


def row_dot(
    A_ND: Tensor,
    B_MD: Tensor,
    token_E: Tensor,
    latent_E: Tensor,
    offsets_N: Tensor,
    backend: str = "torch",
) -> Tensor:
    """out[e] = A[token_e] · B[latent_e] without gathering [nnz, d] (a sampled matmul)."""
    A_ND, B_MD = A_ND.detach().contiguous(), B_MD.detach().contiguous()
    if backend == "triton" and A_ND.is_cuda:
        from saekit.kernels import triton_kernels

        return triton_kernels.row_dot(A_ND, B_MD, token_E, latent_E)
    if B_MD.dtype != A_ND.dtype:
        B_MD = B_MD.to(A_ND.dtype)
    try:
        # aten's per-sample-weights gradient of embedding_bag is exactly this product.
        with torch.autocast(A_ND.device.type, enabled=False):
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                A_ND, B_MD, latent_E, offsets_N, token_E, 0, -1
            )
    except (RuntimeError, AttributeError):  # pragma: no cover - op missing on this build
        return _row_dot_chunked(A_ND, B_MD, token_E, latent_E)


def _row_dot_chunked(A_ND: Tensor, B_MD: Tensor, token_E: Tensor, latent_E: Tensor) -> Tensor:
    out_E = A_ND.new_empty(token_E.shape)
    chunk = max(1, (1 << 22) // max(1, A_ND.shape[1]))  # ≤ 16 MiB of fp32 rows at a time
    for start in range(0, token_E.numel(), chunk):
        sl = slice(start, start + chunk)
        out_E[sl] = (A_ND[token_E[sl]] * B_MD[latent_E[sl]]).sum(-1)
    return out_E


# --------------------------------------------------------------------------------------------
# Sparse decode


class _SparseDecodeFn(torch.autograd.Function):
    """out = Σ_e v_e W_dec[latent_e] by token. grad v_e = g[token_e]·W_dec[latent_e];
    dW_dec[m] = Σ_{e: latent_e = m} v_e · g[token_e] (bags by latent)."""

    @staticmethod
    def forward(ctx, values_E: Tensor, W_dec_MD: Tensor, layout: CodeLayout) -> Tensor:
        ctx.save_for_backward(values_E, W_dec_MD)
        ctx.layout = layout
        return bag_sum(values_E, layout.latent, layout.token_offsets, W_dec_MD, layout.backend)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        values_E, W_dec_MD = ctx.saved_tensors
        layout: CodeLayout = ctx.layout
        grad_ND = grad_ND.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dot(
                grad_ND, W_dec_MD, layout.token, layout.latent, layout.token_offsets, layout.backend
            ).to(values_E.dtype)
        if ctx.needs_input_grad[1]:
            order, token_by_latent, latent_offsets = layout.by_latent()
            grad_W = bag_sum(
                values_E[order], token_by_latent, latent_offsets, grad_ND, layout.backend
            )
        return grad_values, grad_W, None


def sparse_decode(
    values_E: Tensor,
    latent_E: Tensor,
    token_E: Tensor,
    W_dec_MD: Tensor,
    n_tokens: int,
    layout: CodeLayout | None = None,
) -> Tensor:
    """[N, d] = Σ values·W_dec[latent] scattered by token (no b_dec). Token non-decreasing."""
    if layout is None:
        layout = CodeLayout(token_E, latent_E, n_tokens, W_dec_MD.shape[0])
    return _SparseDecodeFn.apply(values_E, W_dec_MD, layout)


def sparse_decode_reference(
    values_E: Tensor, latent_E: Tensor, token_E: Tensor, W_dec_MD: Tensor, n_tokens: int
) -> Tensor:
    """Plain torch: gather [nnz, d] rows, scale, index_add by token."""
    rows_ED = values_E.unsqueeze(1) * W_dec_MD[latent_E]
    out_ND = W_dec_MD.new_zeros(n_tokens, W_dec_MD.shape[1])
    return out_ND.index_add(0, token_E, rows_ED)


def decode_code(
    code: SparseCode, W_dec_MD: Tensor, b_dec_D: Tensor, layout: CodeLayout | None = None
) -> Tensor:
    """x̂_n = b_dec + sparse decode of a SparseCode: what ``SAE.decode_n`` computes."""
    out_ND = sparse_decode(code.values, code.latent, code.token, W_dec_MD, code.n_tokens, layout)
    return out_ND + b_dec_D


# --------------------------------------------------------------------------------------------
# Sparse encoder backward


class _PreactsFn(torch.autograd.Function):
    """Attaches the encoder's gradient to pre-activations already computed at (token, latent).

    v_e = (x_in − b_dec)[token_e]·W_enc[latent_e] + b_enc[latent_e]; with g_e its gradient:
    db_enc[m] = Σ_{latent_e = m} g_e; dW_enc[m] = Σ_{latent_e = m} g_e·x_c[token_e] (bags by
    latent); dx_in[n] = Σ_{token_e = n} g_e·W_enc[latent_e] (bags by token, only if asked);
    db_dec = −Σ_n dx_c[n] = −db_enc·W_enc (an [M]·[M, d] product: no [N, d] pass needed).
    """

    @staticmethod
    def forward(ctx, values_E, x_in_ND, b_dec_D, W_enc_MD, b_enc_M, layout):
        ctx.save_for_backward(x_in_ND, b_dec_D, W_enc_MD)
        ctx.has_b_dec = b_dec_D is not None
        ctx.b_enc_shape = None if b_enc_M is None else b_enc_M.shape
        ctx.layout = layout
        return values_E.clone()

    @staticmethod
    def backward(ctx, grad_E: Tensor):
        x_in_ND, b_dec_D, W_enc_MD = ctx.saved_tensors
        layout: CodeLayout = ctx.layout
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[1:5]
        grad_E = grad_E.to(W_enc_MD.dtype)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        if need_b_enc or need_b_dec:
            db_enc_M = W_enc_MD.new_zeros(layout.d_sae).index_add_(0, layout.latent, grad_E)
            grad_b_enc = db_enc_M if need_b_enc else None
            if need_b_dec:
                grad_b_dec = -(db_enc_M @ W_enc_MD)
        if need_W:
            order, token_by_latent, latent_offsets = layout.by_latent()
            x_c_ND = x_in_ND - b_dec_D if ctx.has_b_dec else x_in_ND
            grad_W = bag_sum(
                grad_E[order], token_by_latent, latent_offsets, x_c_ND.detach(), layout.backend
            )
        if need_x:
            grad_x = bag_sum(grad_E, layout.latent, layout.token_offsets, W_enc_MD, layout.backend)
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc, None


def sparse_preacts(
    x_c_ND: Tensor,
    W_enc_MD: Tensor,
    b_enc_M: Tensor | None,
    token_E: Tensor,
    latent_E: Tensor,
    layout: CodeLayout | None = None,
) -> Tensor:
    """values_e = x_c[token_e]·W_enc[latent_e] + b_enc[latent_e], with the sparse backward."""
    if layout is None:
        layout = CodeLayout(token_E, latent_E, x_c_ND.shape[0], W_enc_MD.shape[0])
    with torch.no_grad():
        values_E = row_dot(x_c_ND, W_enc_MD, token_E, latent_E, layout.token_offsets)
        if b_enc_M is not None:
            values_E = values_E + b_enc_M[latent_E]
    return _PreactsFn.apply(values_E, x_c_ND, None, W_enc_MD, b_enc_M, layout)


def sparse_preacts_reference(
    x_c_ND: Tensor, W_enc_MD: Tensor, b_enc_M: Tensor | None, token_E: Tensor, latent_E: Tensor
) -> Tensor:
    """Plain torch: gather both rows, multiply, sum."""
    values_E = (x_c_ND[token_E] * W_enc_MD[latent_E]).sum(-1)
    return values_E if b_enc_M is None else values_E + b_enc_M[latent_E]


class DenseEncoding(NamedTuple):
    """The encoder matmul computed once, without autograd, plus what its backward needs."""

    pre_NM: Tensor
    """[N, M] detached pre-activations (x_n − b_dec) W_encᵀ + b_enc."""
    x_n_ND: Tensor
    """[N, d] normalised input the encoder read."""
    b_dec_D: Tensor
    W_enc_MD: Tensor
    b_enc_M: Tensor | None


def encode_dense(
    x_n_ND: Tensor,
    W_enc_MD: Tensor,
    b_enc_M: Tensor | None,
    b_dec_D: Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> DenseEncoding:
    """pre = (x_n − b_dec) W_encᵀ + b_enc without autograd; ``autocast_dtype`` (e.g. bfloat16)
    runs the matmul in that dtype, the fp32 master weights and the backward stay fp32."""
    with torch.no_grad():
        x_c_ND = x_n_ND - b_dec_D
        if autocast_dtype is None or autocast_dtype == W_enc_MD.dtype:
            pre_NM = (
                x_c_ND @ W_enc_MD.T if b_enc_M is None else torch.addmm(b_enc_M, x_c_ND, W_enc_MD.T)
            )
        else:
            pre_NM = (x_c_ND.to(autocast_dtype) @ W_enc_MD.to(autocast_dtype).T).to(W_enc_MD.dtype)
            if b_enc_M is not None:
                pre_NM += b_enc_M
    return DenseEncoding(pre_NM, x_n_ND, b_dec_D, W_enc_MD, b_enc_M)


class _DensePreFn(torch.autograd.Function):
    """The detached pre, made differentiable the dense way (a safety net, not the fast path).

    Costs nothing unless a loss differentiates through the whole [N, M] pre (e.g. the "preact"
    revival loss, or AuxK without ``preacts_at``); then it is the reference's dense backward,
    so such a loss stays correct instead of silently losing its encoder gradient.
    """

    @staticmethod
    def forward(ctx, pre_NM, x_n_ND, b_dec_D, W_enc_MD, b_enc_M):
        ctx.save_for_backward(x_n_ND, b_dec_D, W_enc_MD)
        ctx.has_b_enc = b_enc_M is not None
        return pre_NM.view_as(pre_NM)  # an alias: no [N, M] copy

    @staticmethod
    def backward(ctx, grad_NM: Tensor):
        x_n_ND, b_dec_D, W_enc_MD = ctx.saved_tensors
        need_x, need_b_dec, need_W, need_b_enc = ctx.needs_input_grad[1:5]
        grad_NM = grad_NM.to(W_enc_MD.dtype)
        grad_x = grad_b_dec = grad_W = grad_b_enc = None
        if need_W:
            grad_W = grad_NM.T @ (x_n_ND - b_dec_D)  # [M, d]
        if need_b_enc and ctx.has_b_enc:
            grad_b_enc = grad_NM.sum(0)
        if need_x or need_b_dec:
            grad_x_c = grad_NM @ W_enc_MD  # [N, d]
            grad_x = grad_x_c if need_x else None
            grad_b_dec = -grad_x_c.sum(0) if need_b_dec else None
        return None, grad_x, grad_b_dec, grad_W, grad_b_enc


def differentiable_pre(enc: DenseEncoding) -> Tensor:
    """enc.pre_NM (no copy) with the dense encoder backward attached."""
    return _DensePreFn.apply(enc.pre_NM, enc.x_n_ND, enc.b_dec_D, enc.W_enc_MD, enc.b_enc_M)


def attach_preacts(values_E: Tensor, enc: DenseEncoding, layout: CodeLayout) -> Tensor:
    """Make already-computed pre-activation values differentiable w.r.t. the encoder."""
    return _PreactsFn.apply(
        values_E.detach(), enc.x_n_ND, enc.b_dec_D, enc.W_enc_MD, enc.b_enc_M, layout
    )


def preacts_at(
    enc: DenseEncoding, token: Tensor, latent: Tensor, layout: CodeLayout | None = None
) -> Tensor:
    """Differentiable pre-activations at (token, latent) coordinates of any shape (token
    non-decreasing in row-major order), gathered from the detached pre; for AuxK."""
    shape = latent.shape
    token_E, latent_E = token.reshape(-1), latent.reshape(-1)
    if layout is None:
        layout = CodeLayout(token_E, latent_E, enc.pre_NM.shape[0], enc.pre_NM.shape[1])
    d_sae = enc.pre_NM.shape[1]
    values_E = enc.pre_NM.reshape(-1)[token_E * d_sae + latent_E]
    return attach_preacts(values_E, enc, layout).reshape(shape)


# --------------------------------------------------------------------------------------------
# Fused selections


def topk_fast(enc: DenseEncoding, k: int, backend: str = "torch") -> tuple[SparseCode, CodeLayout]:
    """TopK code from a dense encoding; same selection as ``activations.topk_code``."""
    top = enc.pre_NM.topk(k, dim=-1, sorted=False)
    layout = CodeLayout.fixed_k(top.indices, enc.pre_NM.shape[1], backend)
    values_E = torch.relu(attach_preacts(top.values.reshape(-1), enc, layout))
    code = SparseCode(
        values_E, layout.latent, layout.token, enc.pre_NM.shape[0], enc.pre_NM.shape[1]
    )
    return code, layout


def batchtopk_select(
    pre_NM: Tensor, k: int, per_token: int | None = None, full_rows: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The k·N largest entries of pre over the batch: (values [k·N], flat index [k·N] sorted, so
    token-major, and ``exact``: None, or a 0-d bool tensor when the candidate path ran).

    ``per_token=None``: one top-k over the flattened [N·M] (exact; what ``activations.BatchTopK``
    does; fast on GPU, a single-threaded partial sort of N·M entries on CPU).

    ``per_token=c``: candidates = each token's top-c, plus ALL M entries of the ``full_rows``
    tokens (default N/16) whose c-th largest value is highest; then one top-k·N over the
    candidates. Exact whenever at most ``full_rows`` tokens hold ≥ c of the batch's top k·N
    (an entry missed lies below its token's c-th value, which is then ≥ the threshold, so that
    token is a full row). ``exact`` checks this without a host sync: (full_rows+1)-th largest
    c-th value < the batch threshold. Several times cheaper on CPU (c = 4k: one per-token top-c).
    """
    n_tokens, d_sae = pre_NM.shape
    n_keep = k * n_tokens
    per_token = d_sae if per_token is None else min(d_sae, max(per_token, k))
    full_rows = max(1, n_tokens // 16) if full_rows is None else full_rows
    if per_token >= d_sae or full_rows >= n_tokens:
        top = pre_NM.reshape(-1).topk(n_keep, sorted=False)
        flat_E, order = top.indices.sort()
        return top.values[order], flat_E, None
    device = pre_NM.device
    top = pre_NM.topk(per_token, dim=-1, sorted=False)  # [N, c]
    last_N = top.values.min(-1).values  # each token's c-th largest
    ranked = last_N.topk(full_rows + 1)
    rows_R, next_last = ranked.indices[:full_rows], ranked.values[full_rows]
    is_full_N = torch.zeros(n_tokens, dtype=torch.bool, device=device).index_fill_(0, rows_R, True)
    cand_values = torch.cat(
        [
            top.values.masked_fill(is_full_N.unsqueeze(1), -math.inf).reshape(-1),  # [N·c]
            pre_NM.index_select(0, rows_R).reshape(-1),  # [R·M]
        ]
    )
    tokens_N = torch.arange(n_tokens, device=device).unsqueeze(1)
    cand_flat = torch.cat(
        [
            (tokens_N * d_sae + top.indices).reshape(-1),
            (rows_R.unsqueeze(1) * d_sae + torch.arange(d_sae, device=device)).reshape(-1),
        ]
    )
    chosen = cand_values.topk(n_keep, sorted=False)
    flat_E, order = cand_flat[chosen.indices].sort()
    values_E = chosen.values[order]
    exact = next_last < chosen.values.min()
    return values_E, flat_E, exact


def batchtopk_fast(
    enc: DenseEncoding,
    k: int,
    backend: str = "torch",
    per_token: int | None = None,
    full_rows: int | None = None,
) -> tuple[SparseCode, CodeLayout]:
    """BatchTopK (training) code: the k·N largest of ReLU(pre) over the batch, token-sorted.

    ``per_token``/``full_rows``: the candidate selection of :func:`batchtopk_select`; its
    ``exact`` flag is left on the layout (``layout.exact``, None on the exact path).
    """
    n_tokens, d_sae = enc.pre_NM.shape
    values_E, flat_E, exact = batchtopk_select(enc.pre_NM, k, per_token, full_rows)
    token_E = torch.div(flat_E, d_sae, rounding_mode="floor")
    layout = CodeLayout(token_E, flat_E - token_E * d_sae, n_tokens, d_sae, backend=backend)
    layout.exact = exact
    values_E = torch.relu(attach_preacts(values_E, enc, layout))
    return SparseCode(values_E, layout.latent, token_E, n_tokens, d_sae), layout


def auxk_select(
    pre_NM: Tensor, dead_mask_M: Tensor, k_aux: int, n_cols: int | None = None
) -> tuple[Tensor, Tensor]:
    """AuxK candidates: (latent [N, k_aux], keep [N, k_aux]) from the detached pre.

    Semantics of DESIGN.md: top-k_aux of ReLU(pre) over dead latents, fixed shape; ``keep`` is
    False where the entry is not dead or not positive (it contributes 0). Ranking by pre instead
    of ReLU(pre) changes only entries that contribute 0.

    ``n_cols``: gather only that many columns, dead ones first (a fixed-shape column gather,
    ``topk`` of the dead mask), before the top-k_aux. Exact when n_dead ≤ n_cols; with more dead
    latents it ranks an arbitrary n_cols of them. ``None`` ranks all M columns with the others
    masked, always exact. The caller picks n_cols from a dead count it already reads on the host
    (e.g. its logging interval), rounded up to a bucket so shapes rarely change.
    """
    k_aux = min(k_aux, pre_NM.shape[1])
    with torch.no_grad():
        cols_C, cand_NC = dead_candidates(pre_NM, dead_mask_M, k_aux, n_cols)
        top = cand_NC.topk(k_aux, dim=-1, sorted=False)
        latent_Nk = top.indices if cols_C is None else cols_C[top.indices]
        keep_Nk = top.values > 0
    return latent_Nk, keep_Nk


def dead_candidates(
    pre_NM: Tensor, dead_mask_M: Tensor, k_aux: int, n_cols: int | None = None
) -> tuple[Tensor | None, Tensor]:
    """(cols_C, cand_NC): AuxK's candidate pre-activations, −∞ where the latent is not dead.

    ``n_cols`` None (or ≥ M): all M columns, ``cols_C`` None. Otherwise a fixed-shape gather of
    n_cols columns, dead ones first (``topk`` of the dead mask), sorted. No host sync.
    """
    d_sae = pre_NM.shape[1]
    dead_M = dead_mask_M.to(device=pre_NM.device, dtype=torch.bool)
    pre_NM = pre_NM.detach()
    if n_cols is None or n_cols >= d_sae:
        return None, pre_NM.masked_fill(~dead_M, -math.inf)
    n_cols = max(n_cols, k_aux)
    cols_C = torch.topk(dead_M.to(pre_NM.dtype), n_cols, sorted=False).indices.sort().values
    cand_NC = pre_NM.index_select(1, cols_C)
    cand_NC.masked_fill_(~dead_M[cols_C], -math.inf)
    return cols_C, cand_NC


class _AuxKDenseFn(torch.autograd.Function):
    """ê = z_aux W_dec restricted to C gathered columns, as dense [N, C] GEMMs.

    z_NC holds the kept AuxK values (pre at the selected dead entries, > 0) and zeros. Backward:
    g_z = (g W_dec[C]ᵀ)·1[z > 0] is the gradient of pre at the kept entries; dW_dec[C] = z_NCᵀ g;
    dW_enc[C] = g_zᵀ x_c; db_enc[C] = Σ_n g_z; db_dec = −db_enc·W_enc. Four N·C·d GEMMs: on CPU
    cheaper than four sparse passes over N·k_aux entries once C ≤ M (GEMMs run ~20× more MACs
    per second than row gathers).
    """

    @staticmethod
    def forward(ctx, z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, b_enc_M, W_dec_MD):
        W_dec_CD = W_dec_MD.detach().index_select(0, cols_C)
        ctx.save_for_backward(z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, W_dec_CD)
        ctx.d_sae = W_dec_MD.shape[0]
        return z_NC @ W_dec_CD

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        z_NC, cols_C, x_n_ND, b_dec_D, W_enc_MD, W_dec_CD = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc, need_W_dec = ctx.needs_input_grad[2:7]
        M, d = ctx.d_sae, W_enc_MD.shape[1]
        grad_ND = grad_ND.to(W_dec_CD.dtype)
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if need_W_dec:
            grad_W_dec = grad_ND.new_zeros(M, d).index_copy_(0, cols_C, z_NC.T @ grad_ND)
        if need_x or need_b_dec or need_W_enc or need_b_enc:
            g_pre_NC = (grad_ND @ W_dec_CD.T).mul_(z_NC > 0)  # [N, C]
            db_enc_M = grad_ND.new_zeros(M).index_copy_(0, cols_C, g_pre_NC.sum(0))
            grad_b_enc = db_enc_M if need_b_enc else None
            if need_b_dec:
                grad_b_dec = -(db_enc_M @ W_enc_MD)
            if need_W_enc:
                x_c_ND = (x_n_ND - b_dec_D).detach()
                grad_W_enc = grad_ND.new_zeros(M, d).index_copy_(0, cols_C, g_pre_NC.T @ x_c_ND)
            if need_x:
                grad_x = g_pre_NC @ W_enc_MD.detach().index_select(0, cols_C)
        return None, None, grad_x, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec


def _auxk_decode_dense(
    enc: DenseEncoding, W_dec_MD: Tensor, dead_mask_M: Tensor, k_aux: int, n_cols: int | None
) -> Tensor:
    """ê of AuxK through :class:`_AuxKDenseFn`; same selection as :func:`auxk_select`."""
    pre_NM = enc.pre_NM
    n_tokens, d_sae = pre_NM.shape
    with torch.no_grad():
        cols_C, cand_NC = dead_candidates(pre_NM, dead_mask_M, k_aux, n_cols)
        if cols_C is None:
            cols_C = torch.arange(d_sae, device=pre_NM.device)
        top = cand_NC.topk(k_aux, dim=-1, sorted=False)
        # kept = dead and positive; the rest (ReLU'd or −∞) become exact zeros.
        z_NC = torch.zeros_like(cand_NC).scatter_(1, top.indices, top.values.clamp_min(0))
        del cand_NC, top
    return _AuxKDenseFn.apply(
        z_NC, cols_C, enc.x_n_ND, enc.b_dec_D, enc.W_enc_MD, enc.b_enc_M, W_dec_MD
    )


def auxk_loss_fast(
    enc: DenseEncoding,
    residual_ND: Tensor,
    W_dec_MD: Tensor,
    dead_mask_M: Tensor,
    *,
    k_aux: int | None = None,
    alpha: float = 1 / 32,
    normalizer: str = "residual",
    n_cols: int | None = None,
    backend: str = "torch",
    dense: bool = False,
) -> Tensor:
    """DESIGN.md's AuxK from a dense encoding: same value as ``losses.auxk_loss`` (with
    ``preacts_at``).

    Sparse (default): :func:`auxk_select`, :func:`preacts_at` and :func:`sparse_decode`, four
    passes over the N·k_aux entries and no [N, M] gradient. ``dense=True``: GEMMs over the
    gathered columns (:class:`_AuxKDenseFn`), faster on CPU when n_cols (≥ n_dead) is well
    below M or k_aux is large (k_aux = d/2 = 256 at d = 512); the GPU path is the sparse one.
    """
    n_tokens, d_sae = enc.pre_NM.shape
    d = residual_ND.shape[-1]
    k_aux = min(d // 2, d_sae) if k_aux is None else min(k_aux, d_sae)
    e_ND = residual_ND.detach().reshape(-1, d)
    if dense:
        e_hat_ND = _auxk_decode_dense(enc, W_dec_MD, dead_mask_M, k_aux, n_cols)
    else:
        latent_Nk, keep_Nk = auxk_select(enc.pre_NM, dead_mask_M, k_aux, n_cols)
        layout = CodeLayout.fixed_k(latent_Nk, d_sae, backend)
        pre_E = preacts_at(enc, layout.token, layout.latent, layout)
        z_E = torch.where(keep_Nk.reshape(-1), pre_E, torch.zeros_like(pre_E))
        e_hat_ND = sparse_decode(z_E, layout.latent, layout.token, W_dec_MD, n_tokens, layout)
    mse = (e_hat_ND - e_ND).pow(2).sum(-1).mean()
    if normalizer == "residual":
        variance = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
        mse = mse / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    n_dead = dead_mask_M.to(device=mse.device, dtype=mse.dtype).sum()
    return alpha * (n_dead / k_aux).clamp(max=1.0) * mse


# --------------------------------------------------------------------------------------------
# The SAE forward on the fast path (no edit to sae.py needed)


class FastForward(NamedTuple):
    """``SAE.forward``'s output on the fast path, plus the encoding AuxK needs."""

    x_hat: Tensor
    latents: SparseCode
    pre: Tensor
    """[N, M] pre-activations. Differentiable, but through the dense backward
    (:func:`differentiable_pre`); losses that need pre at a few coordinates (AuxK) should call
    :meth:`preacts_at` instead."""
    x_n: Tensor
    x_hat_n: Tensor
    enc: DenseEncoding

    def preacts_at(self, token: Tensor, latent: Tensor) -> Tensor:
        """Differentiable pre-activations at (token, latent), sparse backward (for AuxK)."""
        return preacts_at(self.enc, token, latent)


def fast_forward(
    sae,
    x: Tensor,
    autocast_dtype: torch.dtype | None = None,
    backend: str = "torch",
    batchtopk_per_token: int | None = None,
) -> FastForward:
    """``sae.forward(x)`` for a TopK or BatchTopK SAE in training, on the sparse fast path.

    Same numbers as the reference path (up to float rounding); gradients reach W_enc, b_enc,
    W_dec and b_dec. BatchTopK in eval mode (a dense threshold) is ``sae.forward``'s job;
    ``batchtopk_per_token``: see :func:`batchtopk_select` (None: the exact flat top-k).
    """
    act = sae.activation
    kind = type(act).__name__
    if kind not in ("TopK", "BatchTopK"):
        raise ValueError(f"fast_forward supports TopK and BatchTopK, not {kind}")
    d = sae.cfg.d_in
    lead = x.shape[:-1]
    x_n = x.reshape(-1, d).to(sae.W_enc.dtype) / sae.scale
    enc = encode_dense(x_n, sae.W_enc, sae.b_enc, sae.b_dec, autocast_dtype)
    if kind == "BatchTopK" and not act.training:
        raise ValueError("fast_forward is the training path; use sae.forward in eval mode")
    if kind == "TopK":
        code, layout = topk_fast(enc, act.k, backend)
    else:
        code, layout = batchtopk_fast(enc, act.k, backend, per_token=batchtopk_per_token)
    x_hat_n = decode_code(code, sae.W_dec, sae.b_dec, layout)
    x_hat = (x_hat_n * sae.scale).reshape(*lead, d)
    return FastForward(x_hat, code, differentiable_pre(enc), x_n, x_hat_n, enc)
