"""Feature absorption (saekit.eval.absorption) against loop references of SAEBench's per-word
rules, and on a tiny model with planted absorption."""

from __future__ import annotations

import random

import pytest
import torch

from saekit.eval import absorption as ab
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


def reference_word(acts, cos, proj, main_ids):
    """SAEBench's calculate_absorption for one word, in plain float loops."""
    M = len(acts)
    latent_proj = [acts[i] * cos[i] for i in range(M)]
    main_proj = sum(latent_proj[i] for i in main_ids)
    candidates = sorted(
        (
            latent_proj[i]
            for i in range(M)
            if i not in main_ids and cos[i] >= 0.1 and latent_proj[i] > 0
        ),
        reverse=True,
    )
    absorbers = sum(candidates[:3])
    proportion = absorbers / proj if proj != 0 else 0.0
    if main_proj >= proj or proportion < 0.4:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, proj - main_proj)
        fraction = min(max(absorbed / (absorbed + main_proj), 0.0), 1.0)
    top = max(range(M), key=lambda i: (latent_proj[i], -i))  # ties: the lowest id
    full = (
        all(abs(acts[i]) < 1e-8 for i in main_ids)
        and cos[top] >= 0.025
        and proj > 0
        and latent_proj[top] / proj >= 0.4
    )
    return fraction, full, top


@pytest.mark.parametrize("seed", range(6))
def test_classify_words_matches_the_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    N, M = 40, 12
    # small integers: ties between latents, and main latents exactly off on some words
    acts = torch.randint(0, 4, (N, M), generator=g).double() * (torch.rand(N, M, generator=g) > 0.5)
    cos = torch.randint(-2, 5, (M,), generator=g).double() / 10
    proj = torch.randint(-2, 8, (N,), generator=g).double() / 2
    main = [0, 3] if seed % 2 else [5]
    fraction, full, top = ab.classify_words(acts, cos, proj, main)
    for n in range(N):
        ref = reference_word(acts[n].tolist(), cos.tolist(), float(proj[n]), main)
        assert fraction[n].item() == pytest.approx(ref[0], abs=1e-12), n
        assert bool(full[n]) == ref[1], n
        assert int(top[n]) == ref[2], n


def test_classify_words_planted_cases():
    cos = torch.tensor([1.0, 0.8, 0.05, 0.5])
    acts = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0],  # main off, latent 1 carries 0.8 of 1.0: full absorption
            [0.5, 0.0, 0.0, 0.0],  # main fires and explains it all: none
            [0.2, 0.5, 0.0, 0.0],  # partial: min(0.4, 1 - 0.2) / (0.4 + 0.2)
            [0.0, 0.0, 9.0, 0.0],  # top latent's cosine 0.05 < 0.1: no fraction; full (≥ 0.025)
        ]
    )
    proj = torch.tensor([1.0, 0.5, 1.0, 1.0])
    fraction, full, top = ab.classify_words(acts, cos, proj, [0])
    assert fraction.tolist() == pytest.approx([1.0, 0.0, 0.4 / 0.6, 0.0])
    assert full.tolist() == [True, False, False, True]
    assert top.tolist() == [1, 0, 1, 2]


def test_split_latents_and_top_k_ties():
    latents = [[3], [3, 1], [3, 1, 7], [3, 1, 7, 2]]
    assert ab.split_latents([0.5, 0.6, 0.62, 0.9], latents) == [3, 1]  # 0.62 < 0.6 + 0.03 stops
    assert ab.split_latents([0.5, 0.52, 0.9, 0.95], latents) == [3]
    assert ab.split_latents([0.0, 0.1, 0.2, 0.3], latents) == [3, 1, 7, 2]
    weight = torch.tensor([0.5, 2.0, -3.0, 2.0, 0.5])
    assert ab.top_k_latents(weight, 3) == [1, 3, 0]  # signed, ties to the lowest id


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<bos>", "<unk>", "has", "the", "first", "letter", ":", "A", "B", "C"]
    vocab += words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_letters_without_words_are_reported():
    tokenizer = word_tokenizer(["apple", "bee", "x1"])
    words = ab.first_letter_words(tokenizer)
    texts = {w.text for w in words}
    assert {"apple", "bee", "has", "A"} <= texts and "x1" not in texts and ":" not in texts
    empty = ab.letter_absorption(25, 0, (None, None), (None, None), (None, None), [], None)
    assert not empty.evaluated and empty.reason == "no single-token words"


def planted_model(n_per_letter=300, n_planted=15, seed=0):
    """A GPT-2 whose token embeddings (hook transformer.wte) are u_letter + small noise for the
    words a*/b*/c*, and u_a + v_i for the planted words a0..a14; and an SAE with one main latent
    per letter that the planted words switch off, and one absorbing latent per planted word."""
    from transformers import GPT2Config, GPT2LMHeadModel

    words = [f"{c}{w}" for c in "abc" for w in ab_words(n_per_letter, seed)]
    tokenizer = word_tokenizer(words)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_embd=64,
        n_head=4,
        vocab_size=len(vocab),
        n_positions=128,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    d = 64
    u = torch.eye(d)[:3]  # letter directions
    v = torch.eye(d)[10 : 10 + n_planted]  # one direction per planted word
    emb = torch.zeros(len(vocab), d)
    emb[:, 30:] = 0.15 * torch.randn(len(vocab), d - 30)
    planted = {}
    for word, i in vocab.items():
        if word in words:
            letter = "abc".index(word[0])
            emb[i, :30] = u[letter, :30]
            index = words.index(word)
            if letter == 0 and index < n_planted:
                emb[i, :30] = (u[0] + v[index])[:30]
                planted[word] = index
    with torch.no_grad():
        model.transformer.wte.weight.copy_(emb)
    M = 3 + n_planted + 4
    sae = SAE(SAEConfig(d_in=d, d_sae=M, activation="relu"))
    with torch.no_grad():
        W_enc = torch.zeros(M, d)
        W_dec = torch.zeros(M, d)
        W_enc[:3] = u
        W_enc[0] -= 2 * v.sum(0)
        W_dec[:3] = u
        W_enc[3 : 3 + n_planted] = v
        W_dec[3 : 3 + n_planted] = (u[0] + v) / 2**0.5
        W_enc[3 + n_planted :] = torch.eye(d)[40:44]
        W_dec[3 + n_planted :] = torch.eye(d)[40:44]
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(torch.cat([torch.full((3,), -0.5), torch.zeros(M - 3)]))
        sae.b_dec.zero_()
    return model, tokenizer, sae, planted


def ab_words(n, seed):
    rng = random.Random(seed)
    letters = "defghijklmnopqrstuvwxyz"
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(5)))
    return sorted(out)


def test_planted_absorption_is_found_where_planted_and_nowhere_else(one_thread):
    model, tokenizer, sae, planted = planted_model()
    result = ab.absorption_eval(model, tokenizer, "transformer.wte", sae, seed=0)
    by_letter = {r.letter: r for r in result.letters}
    a, b, c = by_letter["a"], by_letter["b"], by_letter["c"]
    assert a.evaluated and b.evaluated and c.evaluated
    assert a.split_latents == [0] and b.split_latents == [1] and c.split_latents == [2]
    # every absorbed word is a planted one, taken by its own absorbing latent
    assert a.n_full_absorption > 0 and a.absorbed_words
    for word in a.absorbed_words:
        assert word in planted
    assert set(a.absorbing_latents) == {3 + planted[w] for w in a.absorbed_words}
    assert a.full_absorption_rate == pytest.approx(a.n_full_absorption / a.n_true_positives)
    assert a.mean_absorption_fraction == pytest.approx(a.full_absorption_rate)
    for other in (b, c):
        assert other.n_full_absorption == 0 and other.mean_absorption_fraction == 0.0
    assert not by_letter["z"].evaluated and by_letter["z"].reason == "no single-token words"
    assert result.n_letters_evaluated == 3 and not result.enough_letters
    assert result.mean_full_absorption_rate == pytest.approx(a.full_absorption_rate / 3)
