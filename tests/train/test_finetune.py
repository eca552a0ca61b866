"""End-to-end fine-tuning (saekit.train.finetune): the KL + MSE loss against a loop reference,
fine-tuning against plain reconstruction steps on a tiny model, and resuming."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from saekit.cli import main
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE
from saekit.train.finetune import FinetuneConfig, finetune, kl_mse_loss


def test_kl_mse_loss_matches_loops():
    g = torch.Generator().manual_seed(0)
    clean, spliced = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    x, x_hat = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    loss, kl, mse = kl_mse_loss(clean, spliced, x, x_hat, mse_scale=0.3, kl_weight=0.25)
    kls = []
    for n in range(3):
        zc = sum(math.exp(v) for v in clean[n].tolist())
        zs = sum(math.exp(v) for v in spliced[n].tolist())
        p = [math.exp(v) / zc for v in clean[n].tolist()]
        q = [math.exp(v) / zs for v in spliced[n].tolist()]
        kls.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(5)))
    mses = [sum((x[m, j].item() - x_hat[m, j].item()) ** 2 for j in range(2)) for m in range(4)]
    assert kl.item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    assert mse.item() == pytest.approx(sum(mses) / 4, rel=1e-5)
    assert loss.item() == pytest.approx(0.25 * sum(kls) / 3 + 0.75 * 0.3 * sum(mses) / 4, rel=1e-5)


def tiny_setup(tmp_path, tokenizer):
    import random

    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2(initializer_range=0.2)  # peaked next-token distributions
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(50)}" for _ in range(30)) for _ in range(400)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=32, activation={"kind": "topk", "k": 4},
                        hook="transformer.h.1"))  # fmt: skip
    sae.save(tmp_path / "sae")
    return tmp_path / "m", tmp_path / "docs.txt", tmp_path / "sae"


def test_finetune_lowers_heldout_ce_against_plain_steps(tmp_path, tiny_tokenizer, one_thread):
    m, docs, sae = tiny_setup(tmp_path, tiny_tokenizer)
    reports = {}
    for name, kl_weight in (("kl", "0.5"), ("plain", "0")):
        out = tmp_path / name
        args = ["finetune", str(sae), "--model", str(m), "--text-file", str(docs),
                "--out", str(out), "--steps", "40", "--lr", "3e-3", "--kl-weight", kl_weight,
                "--context-length", "32", "--batch-size", "4", "--eval-batches", "4",
                "--local-files-only", "--no-progress"]  # fmt: skip
        assert main(args) == 0
        reports[name] = json.loads((out / "finetune.json").read_text())
        assert SAE.load(out).cfg.d_sae == 32
    kl, plain = reports["kl"], reports["plain"]
    assert kl["before"] == plain["before"]  # the same SAE, the same held-out documents
    assert kl["after"]["ce_sae"] < plain["after"]["ce_sae"]
    assert kl["after"]["kl_sae"] < plain["after"]["kl_sae"]
    assert kl["after"]["ce_sae"] < kl["before"]["ce_sae"] and kl["ce_gap_closed"] > 0


def test_an_interrupted_finetune_resumes_to_the_same_weights(tmp_path, tiny_gpt2, token_ids):
    def run(out, stop_after=None, resume=False):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=64, d_sae=16, activation={"kind": "topk", "k": 2},
                            hook="transformer.h.1"))  # fmt: skip

        def train():
            for i in itertools.count():
                if stop_after is not None and i == stop_after:
                    raise KeyboardInterrupt
                yield torch.roll(token_ids, i, dims=1)

        config = FinetuneConfig(steps=8, lr=1e-2, checkpoint_every=4)
        return finetune(tiny_gpt2, sae, train, lambda: iter([token_ids]), config, out=out,
                        resume=resume), sae  # fmt: skip

    _, whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after=6)
    result, resumed = run(tmp_path / "cut", resume=True)
    assert len(result.history) == 8
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_transcoder_finetunes_on_its_target(tmp_path, tiny_gpt2, token_ids, one_thread):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=64, d_sae=32, d_out=64, activation={"kind": "topk", "k": 4},
        hook="transformer.h.1.mlp:input", target_hook="transformer.h.1.mlp",
    )  # fmt: skip
    sae = SAE(cfg)

    def train():
        for i in itertools.count():
            yield torch.roll(token_ids, i, dims=1)

    config = FinetuneConfig(steps=15, lr=3e-3, checkpoint_every=15)
    result = finetune(tiny_gpt2, sae, train, lambda: iter([token_ids]), config, out=tmp_path)
    assert result.after.kl_sae < result.before.kl_sae
    assert SAE.load(tmp_path).cfg.target_hook == "transformer.h.1.mlp"
