"""Regression tests for the bugs other SAE libraries shipped in 2026 that apply to saekit.

Each test builds the trap and asserts the number; its docstring names the anchor bug. One anchor
lives elsewhere because it needs two processes: the NVIDIA recipe's per-rank dead-latent
counters are checked in tests/train/test_distributed.py
(``test_data_parallel_equals_one_process_on_the_concatenated_batches``: every rank holds the same
``tokens_since_fired``, a latent that never fired holds steps × the GLOBAL batch).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_BOS, TINY_PAD, make_tiny_gpt2, make_tiny_llama
from test_trainer import THREE, make_trainer, run_config

from saekit.data.cache.writing import write_cache
from saekit.data.lm.harvester import Harvester, TokenFilter
from saekit.data.sources.cache import CacheSource
from saekit.eval.calibrate import calibrate_batchtopk
from saekit.eval.splice import splice_eval
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.objective.losses import reconstruction_loss
from saekit.train.checkpoint import read_checkpoint_meta

# ------------------------------------------------------------- 1. SAELens #682: resume


def test_resume_continues_at_the_checkpointed_step_not_from_scratch(tmp_path):
    """SAELens #682: a resumed run silently started from scratch. Bit-identity of a resumed
    run with the uninterrupted one is tests/train/test_trainer.py
    ``test_a_resumed_run_reproduces_the_uninterrupted_run_exactly`` (and
    tests/train/test_run_safety.py, tests/train/test_kill_resume.py); here: the resumed run starts
    at step k, asks the source for
    batch k, and appends to metrics.jsonl after step k instead of logging steps 1..k again."""
    first = make_trainer(run_config(tmp_path, THREE[:1], steps=4, log_every=2))
    first.fit()
    assert read_checkpoint_meta(tmp_path)["step"] == 4

    resumed = make_trainer(run_config(tmp_path, THREE[:1], steps=8, log_every=2))
    starts = []
    batches = resumed.source.batches
    resumed.source.batches = lambda start=0: starts.append(start) or batches(start)
    resumed.load_checkpoint()
    assert resumed.step == 4
    resumed.fit()
    assert starts == [4]
    name = resumed.members[0].cfg.name
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8]


# ------------------------------------------------ 2. SAELens #680: early stop, HF names


@pytest.mark.parametrize(
    ("make", "hook", "later"),
    [
        (make_tiny_llama, "model.layers.0", ["model.layers.1", "model.norm", "lm_head"]),
        (make_tiny_gpt2, "transformer.h.0", ["transformer.h.1", "transformer.ln_f", "lm_head"]),
    ],
)
def test_early_stop_works_for_hf_style_hook_names(make, hook, later):
    """SAELens #680: early stopping was silently off for HF-style hook names. For both
    ``model.layers.N`` (Llama) and ``transformer.h.N`` (GPT-2), the later block, the final norm
    and the LM head never run, and the activations equal a full forward's hidden state."""
    model = make(seed=0)
    calls = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda *_a, name=name: calls.append(name))
        for name in later
    ]
    ids = torch.randint(2, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    keep_all = TokenFilter(exclude_bos=False, exclude_padding=False)
    try:
        acts = Harvester(model, hook, token_filter=keep_all)(ids)[hook]
        assert calls == []
        with torch.no_grad():
            full = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        assert sorted(calls) == sorted(later)  # the hooks do fire on a full forward
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(acts, full.hidden_states[1].reshape(-1, acts.shape[-1]))


# --------------------------------------------- 3. SAELens #763: BatchTopK θ and the fold


def test_batchtopk_threshold_survives_the_scale_fold(tmp_path):
    """SAELens #763: the BatchTopK threshold was off by the folded dataset scale. With s ≠ 1
    and a trained θ, after save (which folds s) and load, encode(raw x) gives the same latents
    and L0; and θ calibrated before saving equals θ calibrated on the loaded SAE."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation={"kind": "batchtopk", "k": 4}))
    g = torch.Generator().manual_seed(1)
    x = 40 * torch.randn(512, 8, generator=g) + 7  # scale far from 1
    sae.init_from_data(x)
    assert float(sae.scale) > 10
    sae.eval()
    calibration = calibrate_batchtopk(sae, [x], 512)
    assert calibration.threshold > 0
    z = sae.encode(x)
    l0 = (z != 0).sum(-1).double().mean()
    assert 1 < l0 < 32

    loaded = SAE.load(sae.save(tmp_path / "sae"))
    loaded.eval()
    assert float(loaded.scale) == 1.0
    assert float(loaded.activation.threshold) == calibration.threshold
    z_loaded = loaded.encode(x)
    assert torch.equal(z_loaded != 0, z != 0)
    torch.testing.assert_close(z_loaded, z, rtol=1e-5, atol=1e-5)
    assert (z_loaded != 0).sum(-1).double().mean() == l0
    again = calibrate_batchtopk(loaded, [x], 512, apply=False)
    assert again.threshold == pytest.approx(calibration.threshold, rel=1e-5)
    assert again.l0 == calibration.l0


# --------------------------------------------- 4. SAELens: splice and excluded tokens


def test_splice_passes_excluded_tokens_through_clean():
    """SAELens splice fed excluded (special) tokens the SAE's output. Positions the TokenFilter
    excludes (BOS, padding) keep their clean activations; kept ones get the reconstruction."""
    model = make_tiny_gpt2(seed=0)
    ids = torch.randint(2, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[:, 0] = TINY_BOS
    ids[0, 5] = TINY_BOS
    ids[1, 7:], mask[1, 7:] = TINY_PAD, 0
    token_filter = TokenFilter(bos_token_id=TINY_BOS)
    keep = token_filter.mask(ids, mask)
    assert (~keep).sum() == 6

    seen = []  # the input of block 2 = block 1's (patched) output, per forward pass
    handle = model.transformer.h[2].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        result = splice_eval(
            model,
            "transformer.h.1",
            lambda x: torch.full_like(x, 1e3),  # wildly different from any activation
            [(ids, mask)],
            token_filter=token_filter,
        )
    finally:
        handle.remove()
    clean, spliced, zero = seen
    assert result.n_spliced == int(keep.sum())
    assert torch.equal(spliced[~keep], clean[~keep])
    assert (spliced[keep] == 1e3).all()
    assert torch.equal(zero[~keep], clean[~keep]) and (zero[keep] == 0).all()


# ------------------------------------- 6. per-token normalised loss and rare loud tokens


def test_reconstruction_loss_weights_each_token_by_its_squared_error():
    """A per-token normalised loss (‖x − x̂‖² / ‖x‖² per token) starved latents of rare,
    high-variance tokens. saekit's L_rec is the batch mean of squared error summed over d, so a
    token with 100× the variance weighs in proportion to its squared error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    x[0] *= 10  # one rare token with 100× the variance
    x_hat = 0.5 * x  # the same relative error on every token
    err = (x - x_hat).pow(2).sum(-1)
    grad = torch.zeros_like(x, requires_grad=True)
    reconstruction_loss(x, x_hat + grad).backward()
    weight = grad.grad.norm(dim=-1)  # each token's pull on the SAE
    loss = reconstruction_loss(x, x_hat)
    assert float(loss) == pytest.approx(float(err.mean()), rel=1e-12)
    share = float(err[0] / err.sum())
    assert share > 0.5  # the loud token dominates, as its error does
    ratio = float(weight[0] / weight[1:].mean())
    assert ratio == pytest.approx(float(x[0].norm() / x[1:].norm(dim=-1).mean()), rel=1e-9)

    # The per-token normalised alternative gives every token the same loss and the loud one
    # a 10× smaller gradient than the others: it would be ignored.
    x_hat_p = x_hat.clone().requires_grad_(True)
    per_token = ((x - x_hat_p).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    per_token.backward()
    w_p = x_hat_p.grad.norm(dim=-1)
    assert float(w_p[0] / w_p[1:].mean()) < 0.2 and ratio > 5


# -------------------------------------------------- 7. one-shard b_dec initialisation


def test_cache_initialisation_sample_spans_several_shards(tmp_path):
    """A one-shard b_dec initialisation was corpus-biased. With shards of very different means
    (a cache written in corpus order) and a shuffle buffer smaller than a shard, the first
    training tokens all come from one shard; the init sample must not: it draws from every
    training shard, so b_dec is the mean of the corpus, not of one shard."""
    n, d = 256, 4
    means = [0.0, 10.0, 20.0, 30.0, 40.0]  # shard 4 is held out
    write_cache(
        tmp_path,
        [torch.full((n, d), m) + 0.1 * torch.randn(n, d) for m in means],
        "h",
        "toy",
        torch.float32,
        shard_tokens=n,
    )
    source = CacheSource(tmp_path, batch_size=32, shuffle_buffer_tokens=64, seed=0, init_tokens=256)
    first = next(source.batches())
    assert len(set((first[:, 0] / 10).round().tolist())) == 1  # the trap: one shard at a time
    sample = source.sample_for_init()
    assert sorted(set((sample[:, 0] / 10).round().tolist())) == [0, 1, 2, 3]
    sae = SAE(SAEConfig(d_in=d, d_sae=8, activation={"kind": "topk", "k": 2}))
    sae.init_from_data(sample)
    torch.testing.assert_close(sae.b_dec * sae.scale, torch.full((d,), 15.0), atol=0.1, rtol=0)
