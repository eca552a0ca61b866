"""A CLT's and a crosscoder's decoder norms as evaluation reads them (saekit.eval.dictionaries):
scale-folded, by plain loops; and a crosscoder trained on the same hook of two tiny models (one a
perturbed copy of the other), with features planted in one model only or in both, whose norm ratios
separate the planted latents."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama

from saekit.data.lm.harvester import Harvester, TokenFilter
from saekit.eval.decoder_norms import SHARED, norm_classes, relative_norm_difference
from saekit.eval.dictionaries import concatenated_decoders, decoder_norms, norm_summary
from saekit.model.clt import CLTConfig, CrossLayerTranscoder
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.train.member import Member
from saekit.train.member_config import SAETrainConfig


def norm(values):
    return math.sqrt(sum(v * v for v in values))


def test_clt_norms_are_the_saved_decoders_whatever_the_scales():
    L, M, d_in, d_out = 3, 5, 4, 6
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        CLTConfig(d_in=d_in, d_sae=M, n_layers=L, d_out=d_out, activation={"kind": "relu"})
    )
    with torch.no_grad():
        clt.target_scale.copy_(torch.tensor([0.5, 3.0, 1.5]))
        clt.scale.copy_(torch.tensor([2.0, 0.25, 4.0]))
        clt.W_dec[0][1] = 0  # a latent with no decoder
    norms = decoder_norms(clt)
    rows = concatenated_decoders(clt)
    for layer in range(L):
        for i in range(M):
            for t in range(L):
                want = 0.0
                if t >= layer:
                    want = float(clt.target_scale[t]) * norm(
                        clt.W_dec[layer][i, t - layer].tolist()
                    )
                assert float(norms[layer, i, t]) == pytest.approx(want, rel=1e-6, abs=1e-12)
                block = rows[layer * M + i, t * d_out : (t + 1) * d_out]
                assert norm(block.tolist()) == pytest.approx(want, rel=1e-6, abs=1e-12)
    folded = clt.folded_copy()  # as saved: scales 1, folded into W_dec
    assert float(folded.target_scale.max()) == 1.0
    assert torch.allclose(decoder_norms(folded), norms, rtol=1e-6)
    assert norm_summary(clt).zero_decoder == 1


def test_crosscoder_norms_are_the_saved_decoders_whatever_the_scales():
    S, M, d = 2, 6, 4
    torch.manual_seed(1)
    cc = Crosscoder(CrosscoderConfig(d_in=d, d_sae=M, n_sources=S, activation={"kind": "relu"}))
    with torch.no_grad():
        cc.scale.copy_(torch.tensor([0.5, 4.0]))
    norms = decoder_norms(cc)
    for s in range(S):
        for i in range(M):
            want = float(cc.scale[s]) * norm(cc.W_dec[s, i].tolist())
            assert float(norms[s, i]) == pytest.approx(want, rel=1e-6)
            assert norm(concatenated_decoders(cc)[i, s * d : (s + 1) * d].tolist()) == (
                pytest.approx(want, rel=1e-6)
            )
    assert torch.allclose(decoder_norms(cc.folded_copy()), norms, rtol=1e-6)


HOOK = "model.layers.1"  # the residual stream after block 1


def planted_activations(n_contexts=96, T=32, p=0.12, seed=0):
    """Rows [x_A | x_B]: the same hook of a tiny Llama (A) and a perturbed copy (B) on the same
    tokens, plus three planted features, each on its own tokens: one added to A's activations
    only, one to B's only, one to both (a different direction in each model)."""
    model_a = make_tiny_llama(seed=0, n_layer=2)
    model_b = copy.deepcopy(model_a)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model_b.parameters():
            param.add_(0.2 * param.std() * torch.randn(param.shape, generator=g))
    ids = torch.randint(2, 250, (n_contexts, T), generator=g)
    keep = TokenFilter(exclude_bos=False)
    x_a = Harvester(model_a, HOOK, token_filter=keep)(ids)[HOOK]
    x_b = Harvester(model_b, HOOK, token_filter=keep)(ids)[HOOK]
    d = x_a.shape[1]
    directions = torch.randn(4, d, generator=g)
    u_a, u_b, s_a, s_b = directions / directions.norm(dim=1, keepdim=True)
    strength = 3 * x_a.norm(dim=1).mean()
    n = x_a.shape[0]
    on = torch.rand(3, n, generator=g) < p  # feature f on token j
    c = strength * (1 + torch.rand(3, n, generator=g)) * on
    x_a = x_a + c[0, :, None] * u_a + c[2, :, None] * s_a
    x_b = x_b + c[1, :, None] * u_b + c[2, :, None] * s_b
    zero = torch.zeros(d)
    planted = {  # each feature's concatenated direction
        "only A": torch.cat([u_a, zero]),
        "only B": torch.cat([zero, u_b]),
        "shared": torch.cat([s_a, s_b]),
    }
    return torch.cat([x_a, x_b], dim=1), planted


def test_planted_model_specific_latents_are_separated_by_the_norm_ratios(one_thread):
    rows, planted = planted_activations()
    d = rows.shape[1] // 2
    cfg = SAETrainConfig(
        sae={"kind": "crosscoder", "d_in": d, "d_sae": 32, "n_sources": 2,
             "activation": {"kind": "topk", "k": 4}},
        lr=1e-2, warmup_steps=10, seed=0,
    )  # fmt: skip
    steps = 300
    member = Member(cfg, total_steps=steps, device="cpu")
    member.init_from_data(rows)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        member.train_step(rows[torch.randint(0, rows.shape[0], (256,), generator=g)], step)
    cc = member.sae
    norms = decoder_norms(cc)  # [2, M], the scales folded
    delta = relative_norm_difference(norms)
    classes = norm_classes(norms)
    decoders = concatenated_decoders(cc)
    decoders = decoders / decoders.norm(dim=1, keepdim=True)
    for name, direction in planted.items():
        cos = decoders @ (direction / direction.norm()).double()  # both in the data's units
        latent = int(cos.argmax())
        assert float(cos[latent]) > 0.9, (name, float(cos[latent]))
        if name == "only A":
            assert float(delta[latent]) < 0.1 and int(classes[latent]) == 0, float(delta[latent])
        elif name == "only B":
            assert float(delta[latent]) > 0.9 and int(classes[latent]) == 1, float(delta[latent])
        else:
            assert abs(float(delta[latent]) - 0.5) < 0.1 and int(classes[latent]) == SHARED
    summary = norm_summary(cc)  # as eval.json and saekit eval write it
    assert summary.only[0] >= 1 and summary.only[1] >= 1 and summary.shared >= 1
