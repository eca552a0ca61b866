"""CE/KL splice evaluation against a plain per-token float64 computation."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BOS, TINY_PAD, make_tiny_gpt2

from saekit.data.lm.harvester import Harvester, TokenFilter
from saekit.eval.splice import splice_eval

HOOK = "transformer.h.1"
D = 64
FILTER = TokenFilter(bos_token_id=TINY_BOS)


@pytest.fixture(scope="module")
def model():
    """Larger init than the shared tiny GPT-2 so next-token distributions are peaked and the
    clean/zero-ablated gap is large (default init: CE ~ ln(vocab) everywhere)."""
    return make_tiny_gpt2(seed=0, initializer_range=0.2)


def make_reconstruct(seed=0):
    """A fixed imperfect 'SAE': x W + b with W near the identity."""
    g = torch.Generator().manual_seed(seed)
    W = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / D**0.5
    b = 0.2 * torch.randn(D, generator=g)
    return lambda x: x @ W + b


def make_batches():
    """Two batches with very different token counts, padding and BOS positions."""
    g = torch.Generator().manual_seed(7)
    ids_a = torch.randint(2, 250, (3, 16), generator=g)
    mask_a = torch.ones_like(ids_a)
    ids_a[:, 0] = TINY_BOS
    ids_a[1, 9] = TINY_BOS
    ids_a[2, 12:], mask_a[2, 12:] = TINY_PAD, 0
    ids_b = torch.randint(2, 250, (1, 6), generator=g)
    return [(ids_a, mask_a), (ids_b, torch.ones_like(ids_b))]


def manual_eval(model, reconstruct, batches):
    """Plain loops: edit kept positions by hand, per-token log_softmax in float64."""
    edit_fn = None

    def hook(_module, _args, output):
        return edit_fn(output) if edit_fn is not None else output

    handle = model.transformer.h[1].register_forward_hook(hook)
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    per_batch_ce_clean, count = [], 0
    try:
        for ids, mask in batches:
            B, T = ids.shape
            kept = [
                (b, t)
                for b in range(B)
                for t in range(T)
                if mask[b, t] == 1 and ids[b, t] != TINY_BOS
            ]

            def editor(token_fn, kept=kept):
                def edit(act):
                    out = act.clone()
                    for b, t in kept:
                        out[b, t] = token_fn(act[b, t])
                    return out

                return edit

            logits = {}
            for name, token_fn in [
                ("clean", None),
                ("sae", lambda v: reconstruct(v[None])[0]),
                ("zero", lambda v: torch.zeros_like(v)),
            ]:
                edit_fn = None if token_fn is None else editor(token_fn)
                with torch.no_grad():
                    logits[name] = model(ids, attention_mask=mask).logits.double()
            edit_fn = None
            batch_ce, batch_n = 0.0, 0
            for b, t in kept:
                if t == T - 1 or mask[b, t + 1] == 0:
                    continue
                target = ids[b, t + 1]
                lp = {k: torch.log_softmax(v[b, t], -1) for k, v in logits.items()}
                for k in ("clean", "sae", "zero"):
                    sums[f"ce_{k}"] += -float(lp[k][target])
                for k in ("sae", "zero"):
                    sums[f"kl_{k}"] += float((lp["clean"].exp() * (lp["clean"] - lp[k])).sum())
                batch_ce += -float(lp["clean"][target])
                batch_n += 1
            per_batch_ce_clean.append(batch_ce / batch_n)
            count += batch_n
    finally:
        handle.remove()
    means = {k: v / count for k, v in sums.items()}
    means["n_tokens"] = count
    means["mean_of_batch_means"] = sum(per_batch_ce_clean) / len(per_batch_ce_clean)
    return means


def test_scores_equal_a_plain_per_token_computation(model):
    reconstruct, batches = make_reconstruct(), make_batches()
    got = splice_eval(model, HOOK, reconstruct, batches, token_filter=FILTER)
    ref = manual_eval(model, reconstruct, batches)
    # batch A: 3 rows x 15 predicting positions - 3 BOS at 0 - BOS at 9 - 4 padded targets
    # (row 2 positions 11..14) - the padded positions 12..14 themselves counted once; batch B: 5
    assert got.n_tokens == ref["n_tokens"] == (45 - 3 - 1 - 4) + 5
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert getattr(got, key) == pytest.approx(ref[key], rel=1e-5), key
    ce_score = (ref["ce_zero"] - ref["ce_sae"]) / (ref["ce_zero"] - ref["ce_clean"])
    kl_score = (ref["kl_zero"] - ref["kl_sae"]) / ref["kl_zero"]
    assert got.ce_score == pytest.approx(ce_score, rel=1e-4)
    assert got.kl_score == pytest.approx(kl_score, rel=1e-4)
    # the trap is real: the per-batch mean differs from the token mean
    assert abs(ref["mean_of_batch_means"] - ref["ce_clean"]) > 1e-3
    assert 0.05 < got.kl_sae < got.kl_zero  # an imperfect reconstruction, better than zero


def test_fvu_is_a_ratio_of_sums_over_the_spliced_tokens(model):
    reconstruct, batches = make_reconstruct(), make_batches()
    got = splice_eval(model, HOOK, reconstruct, batches, token_filter=FILTER)
    harvester = Harvester(model, HOOK, token_filter=FILTER)
    x = torch.cat([harvester(ids, mask)[HOOK] for ids, mask in batches]).double()
    x_hat = reconstruct(x.float()).double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert got.n_spliced == len(x) == (48 - 4 - 4) + 6
    assert got.fvu == pytest.approx(fvu, rel=1e-6)


def test_identity_gives_perfect_scores(model):
    got = splice_eval(model, HOOK, lambda x: x.clone(), make_batches(), token_filter=FILTER)
    assert got.ce_sae == got.ce_clean
    assert got.ce_score == 1.0
    assert got.kl_sae == 0.0 and got.kl_score == 1.0
    assert got.fvu == 0.0
    assert got.ce_zero > got.ce_clean + 0.1  # zero-ablation actually hurts


def test_zero_reconstruction_scores_zero(model):
    got = splice_eval(model, HOOK, torch.zeros_like, make_batches(), token_filter=FILTER)
    assert got.ce_sae == got.ce_zero
    assert got.ce_score == 0.0 and got.kl_score == 0.0
    assert got.fvu >= 1.0  # ‖x‖² / ‖x − x̄‖² >= 1


def test_input_side_hook_equals_previous_blocks_output(model):
    # the input of block 2 is the output of block 1: splicing either must agree exactly
    reconstruct, batches = make_reconstruct(seed=3), make_batches()
    at_output = splice_eval(model, HOOK, reconstruct, batches, token_filter=FILTER)
    at_input = splice_eval(
        model, "transformer.h.2:input", reconstruct, batches, token_filter=FILTER
    )
    assert at_input == at_output


def test_model_without_logits_is_refused(model):
    with pytest.raises(ValueError, match="no logits.*AutoModelForCausalLM"):
        splice_eval(model.transformer, "h.1", lambda x: x, make_batches())
