"""k-sparse probing (saekit.eval.sparse_probing) and the float64 probes it shares with
absorption (saekit.eval.logistic), against loop references; a planted binary feature."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.eval import sparse_probing as sp
from saekit.eval.logistic import f1_score, fit_l1_logistic, fit_logistic, roc_auc, sample_weights
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


def test_mean_diff_latents_matches_a_loop_with_ties():
    z = torch.tensor([[1.0, 3.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.0, 1.0, 0.0, 2.0]])
    y = torch.tensor([True, True, False])
    # diff = [1, 2, 1, −2]: the ties 1, 3 (|−2| counts), then the ties 0, 2, in id order
    diffs = []
    for j in range(4):
        pos = [z[i, j].item() for i in range(3) if y[i]]
        neg = [z[i, j].item() for i in range(3) if not y[i]]
        diffs.append(abs(sum(pos) / len(pos) - sum(neg) / len(neg)))
    reference = sorted(range(4), key=lambda j: (-diffs[j], j))
    for k in range(1, 5):
        assert sp.mean_diff_latents(z, y, k) == reference[:k]
    assert reference == [1, 3, 0, 2]


def test_fit_logistic_is_at_the_sklearn_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.8 * torch.randn(60, generator=g, dtype=torch.float64)) > 0.3
    for balanced in (False, True):
        probe = fit_logistic(x, y, C=0.7, balanced=balanced)
        s = sample_weights(y, balanced)
        # gradient of ½‖w‖² + C Σ s_i log(1 + exp(−ỹ_i (x_i·w + b))), by loops: zero at the optimum
        grad_w, grad_b = [probe.weight[j].item() for j in range(3)], 0.0
        for i in range(60):
            sign = 1.0 if y[i] else -1.0
            margin = sign * (sum(x[i, j].item() * probe.weight[j].item() for j in range(3)))
            margin += sign * probe.bias
            coef = -0.7 * s[i].item() * sign / (1 + math.exp(margin))
            for j in range(3):
                grad_w[j] += coef * x[i, j].item()
            grad_b += coef
        assert max(abs(v) for v in [*grad_w, grad_b]) < 1e-6


def test_fit_l1_logistic_meets_the_subgradient_conditions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 5, generator=g, dtype=torch.float64)
    y = x[:, 1] > 0.2
    probe = fit_l1_logistic(x, y, l1=0.05)
    pos_weight = (80 - y.sum().item()) / y.sum().item()
    grad = [0.0] * 6
    for i in range(80):
        score = sum(x[i, j].item() * probe.weight[j].item() for j in range(5)) + probe.bias
        p = 1 / (1 + math.exp(-score))
        s = pos_weight if y[i] else 1.0
        for j in range(5):
            grad[j] += s * (p - float(y[i])) * x[i, j].item() / 80
        grad[5] += s * (p - float(y[i])) / 80
    assert abs(grad[5]) < 1e-5
    for j in range(5):
        w = probe.weight[j].item()
        if w != 0:
            assert abs(grad[j] + 0.05 * math.copysign(1, w)) < 1e-5
        else:
            assert abs(grad[j]) <= 0.05 + 1e-6
    assert probe.weight[1] > 0 and probe.weight.abs().argmax() == 1


def test_auc_and_f1_against_pair_loops():
    score = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.2])
    actual = torch.tensor([False, True, False, True, False])
    pairs = [(p, n) for p in (0.4, 0.8) for n in (0.1, 0.4, 0.2)]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(score, actual) == pytest.approx(expected)
    assert f1_score(score > 0.3, actual) == pytest.approx(2 * 2 / (3 + 2))


def test_read_labelled_csv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nhello there,yes\nbye,no\n")
    rows = sp.read_labelled(tmp_path / "a.csv")
    assert rows == [sp.Example("hello there", True), sp.Example("bye", False)]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    assert [e.label for e in sp.read_labelled(tmp_path / "b.jsonl")] == [True, False]
    (tmp_path / "c.csv").write_text("text,label\na,1\nb,2\nc,3\n")
    with pytest.raises(ValueError, match="exactly two labels"):
        sp.read_labelled(tmp_path / "c.csv")


def test_a_planted_binary_feature_is_separated_at_k_1(one_thread, tiny_tokenizer):
    """Tokens w0..w24 carry a planted direction e_0 (the class), all tokens noise elsewhere;
    the SAE's latent 5 reads e_0, its other latents read noise: k = 1 picks latent 5."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=60, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    vocab = tiny_tokenizer.get_vocab()
    emb = 0.5 * torch.randn(60, 32)
    emb[:, 0] = 0
    for i in range(25):
        emb[vocab[f"w{i}"], 0] = 1.0
    with torch.no_grad():
        model.transformer.wte.weight.copy_(emb)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, activation="relu"))
    with torch.no_grad():
        W = torch.eye(32)[:16].clone()
        W[:5] = torch.eye(32)[1:6]
        W[5] = torch.eye(32)[0]
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    examples = [sp.Example(f"w{i % 50}", i % 50 < 25) for i in range(200)]
    result = sp.sparse_probing_eval(
        model, tiny_tokenizer, "transformer.wte", sae, examples, ks=(1, 2)
    )
    one = result.sparse[0]
    assert one.k == 1 and one.latents == [5]
    assert one.accuracy == 1.0 and one.auc == 1.0
    assert result.dense.accuracy == 1.0
    assert result.n_train % 2 == 0 and result.n_test == 40


def test_builtin_tasks_come_from_the_tokenizer():
    from test_absorption import word_tokenizer

    from saekit.eval.suite import SuiteOptions, _tasks

    tokenizer = word_tokenizer(["apple", "Echo", "bee", "cat", "x1"])
    vowel = {e.text: e.label for e in sp.builtin_task("first_letter_vowel", tokenizer)}
    capital = {e.text: e.label for e in sp.builtin_task("capitalised", tokenizer)}
    assert vowel["apple"] and vowel["Echo"] and vowel["A"] and not vowel["bee"]
    assert capital["Echo"] and capital["B"] and not capital["cat"] and "x1" not in capital
    with pytest.raises(ValueError, match="unknown built-in"):
        sp.builtin_task("sentiment", tokenizer)
    with pytest.raises(ValueError, match="give --probe-data"):
        _tasks(SuiteOptions(["sparse_probing"], None, []), tokenizer)  # too few words
