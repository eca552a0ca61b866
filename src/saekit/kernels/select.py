"""The fixed-shape selections of the TopK family; the reference path calls the same functions on
a differentiable pre, so "what is selected" has one home.

Nothing here reads a CUDA tensor on the host. The one data-dependent branch (BatchTopK's exact
fallback) is taken on CPU tensors only, where reading a flag is not a device sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CANDIDATES_PER_K = 4
"""BatchTopK on CPU: each token contributes its top-(4k) as candidates (benchmarks/README.md,
"BatchTopK": 163 ms at N=4096, M=8192, k=32, where the flat top-k took 693 ms and TopK's own
top-k 59 ms). 2k was faster (91 ms) but a token holds more than twice the mean count of the
batch's top entries often enough in trained SAEs to make the exact fallback common."""
FULL_ROWS_PER_TOKENS = 32
"""...plus all M entries of the N/32 (at least one) tokens whose (4k)-th value is highest."""


def topk_select(pre_NM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each token's k largest pre-activations: (values [N, k], latent [N, k]), unsorted."""
    top = pre_NM.topk(k, dim=-1, sorted=False)
    return top.values, top.indices


def batchtopk_flat(pre_NM: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k·N largest entries by one top-k of the flattened [N·M]: (values, flat index), sorted
    by flat index (token-major). Fast on GPU; on CPU a single-threaded partial sort."""
    n_tokens = pre_NM.shape[0]
    top = pre_NM.reshape(-1).topk(k * n_tokens, sorted=False)
    flat_E, order = top.indices.sort()
    return top.values[order], flat_E


def batchtopk_candidates(
    pre_NM: Tensor, k: int, per_token: int, full_rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The k·N largest entries among candidates: each token's top-``per_token`` plus ALL M
    entries of the ``full_rows`` tokens whose per_token-th value is highest. Returns (values,
    flat index sorted, ``exact``: 0-d bool, computed on the device).

    ``exact`` ⇔ the (full_rows+1)-th highest per_token-th value t* < τ_c, the smallest chosen
    value. Then the result is a valid top-k·N of the whole batch: an entry that is not a
    candidate lies in a token that is not a full row and is not among its token's top-c, so it
    is ≤ that token's c-th value ≤ t* < τ_c, below everything chosen. Ties at τ_c make the
    flag False (t* = τ_c), never a wrong True.
    """
    n_tokens, d_sae = pre_NM.shape
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
    chosen = cand_values.topk(k * n_tokens, sorted=False)
    flat_E, order = cand_flat[chosen.indices].sort()
    return chosen.values[order], flat_E, next_last < chosen.values.min()


def reads_free(tensor: Tensor) -> bool:
    """Whether reading this tensor's values on the host costs no device sync (a CPU tensor).
    The no-sync test patches it to False, to run the path a GPU takes."""
    return tensor.device.type == "cpu"


FLOOR_CANDIDATES_PER_KEPT = 4
"""The floor path gives up when more than 4·k·N entries clear the floor (a floor far too low)."""


def batchtopk_above(pre_NM: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor] | None:
    """The k·N largest entries found among those above ``floor``: (values, flat index sorted),
    or None when fewer than k·N or more than 4·k·N entries are above it. CPU only (the count is
    read on the host).

    Exact when it returns: with at least k·N entries > floor, the k·N-th largest value is
    > floor, so every entry of a top-k·N of the batch is among the candidates. A floor just
    under the previous batch's k·N-th value leaves ~2·k·N candidates: one compare and one
    compaction over [N, M] instead of each token's top-4k (benchmarks/README.md, "BatchTopK").
    """
    n_keep = k * pre_NM.shape[0]
    flat_C = torch.nonzero(pre_NM.reshape(-1) > floor).reshape(-1)  # ascending: token-major
    if not n_keep <= flat_C.numel() <= FLOOR_CANDIDATES_PER_KEPT * n_keep:
        return None
    values_C = pre_NM.reshape(-1).index_select(0, flat_C)
    chosen = values_C.topk(n_keep, sorted=False).indices.sort().values
    return values_C.index_select(0, chosen), flat_C.index_select(0, chosen)


def batchtopk_select(pre_NM: Tensor, k: int, floor: float | None = None) -> tuple[Tensor, Tensor]:
    """The k·N largest entries of pre over the whole batch: (values [k·N], flat index [k·N]),
    sorted by flat index, so token-major (a CSR-ordered code). Always exact.

    CUDA: one flat top-k (parallel there; nothing is read on the host). CPU: with a ``floor``
    (a guess just under the k·N-th value, e.g. from the previous batch), the entries above it
    (:func:`batchtopk_above`); else, or when that cannot certify the result, the candidates of
    :func:`batchtopk_candidates`, whose exactness flag is read on the host (a CPU tensor, so no
    device sync); a batch neither certifies falls back to the flat top-k. The floor changes
    only the cost, never the entries chosen (up to ties at the k·N-th value).
    """
    n_tokens, d_sae = pre_NM.shape
    per_token = CANDIDATES_PER_K * k
    full_rows = max(1, n_tokens // FULL_ROWS_PER_TOKENS)
    if not reads_free(pre_NM):
        return batchtopk_flat(pre_NM, k)
    if floor is not None:
        found = batchtopk_above(pre_NM, k, floor)
        if found is not None:
            return found
    if per_token >= d_sae or full_rows >= n_tokens:
        return batchtopk_flat(pre_NM, k)
    values_E, flat_E, exact = batchtopk_candidates(pre_NM, k, per_token, full_rows)
    if bool(exact):
        return values_E, flat_E
    return batchtopk_flat(pre_NM, k)


def auxk_select(
    pre_NC: Tensor, dead_mask_C: Tensor, k_aux: int, *, overwrite: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """AuxK candidates: (column [N, k'], keep [N, k'], value [N, k']) from the detached pre,
    k' = min(k_aux, C); a fixed shape (docs/design.md, "AuxK"). ``value`` is pre at the
    selected entries (−∞ where the column is not dead), so nothing reads the matrix again.

    The top-k_aux of ReLU(pre) over dead latents among the C columns given (all M, or a gathered
    superset of the dead latents: the same selection, since live columns are masked to −∞).
    ``keep`` is False where the entry is not dead or not positive (it contributes 0). Ranking
    pre with live latents at −∞ instead of ReLU(pre) changes only entries that contribute 0.

    ``overwrite``: ``pre_NC`` is the caller's own copy (a gather of rows or columns), masked in
    place: a copy of [N, C] cost 5× the masking itself on the project's CPU.
    """
    dead_C = dead_mask_C.to(device=pre_NC.device, dtype=torch.bool)
    with torch.no_grad():
        candidates_NC = pre_NC.detach() if overwrite else pre_NC.detach().clone()
        candidates_NC.masked_fill_(~dead_C, -math.inf)
        top = candidates_NC.topk(min(k_aux, pre_NC.shape[1]), dim=-1, sorted=False)
    return top.indices, top.values > 0, top.values
