"""A cross-layer transcoder spliced in for every MLP at once (saekit.eval.replacement) against a
plain per-token float64 computation: each MLP's forward replaced by hand, the CLT's prediction from
the residual the replacement model itself computes (the spliced forward)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_BOS, TINY_PAD, make_tiny_llama

from saekit.data.lm.harvester import Harvester, TokenFilter
from saekit.eval.replacement import LayeredDictionary, replacement_eval
from saekit.model.clt import CLTConfig, CrossLayerTranscoder

L, D, M = 3, 64, 16
FILTER = TokenFilter(bos_token_id=TINY_BOS)
INPUTS = [f"model.layers.{layer}.mlp:input" for layer in range(L)]
TARGETS = [f"model.layers.{layer}.mlp" for layer in range(L)]


@pytest.fixture(scope="module")
def model():
    """Peaked next-token distributions: zero-ablating the MLPs moves CE clearly."""
    return make_tiny_llama(seed=0, n_layer=L, initializer_range=0.2)


class Weights:
    """A ReLU CLT's parameters, for saekit's CrossLayerTranscoder (:meth:`clt`) and for the plain
    float64 loops of :meth:`token_prediction`: W_enc [L, M, d], b_enc [L, M], W_dec[l]
    [M, L-l, d], b_dec [L, d], scale [L], target_scale [L];
    ŷ^t = s_y^t (Σ_{l≤t} z^l W_dec[l][:, t-l] + b_dec^t), z^l = ReLU(x^l / s^l W_enc^lᵀ + b_enc^l).
    Traps: nonzero b_dec, scales ≠ 1, dead latents."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(L, M, D, generator=g) / D**0.5
        self.b_enc = 0.1 * torch.randn(L, M, generator=g)
        self.b_enc[:, :3] = -1e3  # dead latents in every layer
        self.W_dec = [
            0.3 * torch.randn(M, L - layer, D, generator=g) / M**0.5 for layer in range(L)
        ]
        self.b_dec = 0.05 * torch.randn(L, D, generator=g)
        self.scale = torch.tensor([0.5, 2.0, 3.0])
        self.target_scale = torch.tensor([0.7, 1.5, 0.4])

    @torch.no_grad()
    def clt(self, inputs=INPUTS, activation=None):
        cfg = CLTConfig(
            d_in=D,
            d_sae=M,
            n_layers=L,
            activation=activation or {"kind": "relu"},
            hooks=list(inputs),
            target_hooks=TARGETS,
        )
        clt = CrossLayerTranscoder(cfg)
        clt.W_enc.copy_(self.W_enc)
        clt.b_enc.copy_(self.b_enc)
        for layer in range(L):
            clt.W_dec[layer].copy_(self.W_dec[layer])
        clt.b_dec.copy_(self.b_dec)
        clt.scale.copy_(self.scale)
        clt.target_scale.copy_(self.target_scale)
        return clt

    def layered(self, inputs=INPUTS):
        return LayeredDictionary.of(self.clt(inputs))

    def token_prediction(self, t, xs):
        """ŷ^t of one token from its MLP inputs xs[0..t] (float64 lists), by plain loops."""
        z = []
        for layer in range(t + 1):
            row = []
            for i in range(M):
                pre = float(self.b_enc[layer, i])
                for k in range(D):
                    pre += xs[layer][k] / float(self.scale[layer]) * float(self.W_enc[layer, i, k])
                row.append(max(pre, 0.0))
            z.append(row)
        out = []
        for j in range(D):
            acc = float(self.b_dec[t, j])
            for layer in range(t + 1):
                for i in range(M):
                    acc += z[layer][i] * float(self.W_dec[layer][i, t - layer, j])
            out.append(float(self.target_scale[t]) * acc)
        return out


def make_batches():
    """Two batches of different sizes with BOS and padding (as tests/eval/test_splice.py)."""
    g = torch.Generator().manual_seed(7)
    ids_a = torch.randint(2, 250, (2, 9), generator=g)
    mask_a = torch.ones_like(ids_a)
    ids_a[:, 0] = TINY_BOS
    ids_a[1, 5] = TINY_BOS
    ids_a[1, 7:], mask_a[1, 7:] = TINY_PAD, 0
    ids_b = torch.randint(2, 250, (1, 5), generator=g)
    return [(ids_a, mask_a), (ids_b, torch.ones_like(ids_b))]


def reference(model, clt, batches):
    """Each MLP's forward replaced by hand at the kept positions; per-token CE/KL in float64."""
    mode, xs_tok, sums, count = None, {}, {}, 0
    spliced_err = [0.0] * L
    spliced_rows = [[] for _ in range(L)]
    originals = [model.model.layers[layer].mlp.forward for layer in range(L)]

    def wrapped(layer):
        def forward(x):
            y = originals[layer](x)
            if mode is None:
                return y
            out = y.clone()
            for b, t in kept:
                if mode == "zero":
                    out[b, t] = 0
                    continue
                xs_tok.setdefault((b, t), {})[layer] = x[b, t].double().tolist()
                pred = clt.token_prediction(layer, xs_tok[(b, t)])
                truth = y[b, t].double().tolist()
                spliced_err[layer] += sum((p - q) ** 2 for p, q in zip(pred, truth, strict=True))
                spliced_rows[layer].append(truth)
                out[b, t] = torch.tensor(pred, dtype=y.dtype)
            return out

        return forward

    for layer in range(L):
        model.model.layers[layer].mlp.forward = wrapped(layer)
    try:
        for ids, mask in batches:
            B, T = ids.shape
            kept = [
                (b, t) for b in range(B) for t in range(T) if mask[b, t] and ids[b, t] != TINY_BOS
            ]
            logits = {}
            for mode in (None, "sae", "zero"):
                xs_tok = {}
                with torch.no_grad():
                    logits[mode] = model(ids, attention_mask=mask).logits.double()
            mode = None
            for b, t in kept:
                if t == T - 1 or mask[b, t + 1] == 0:
                    continue
                lp = {k: torch.log_softmax(v[b, t], -1) for k, v in logits.items()}
                target = ids[b, t + 1]
                for k, name in ((None, "clean"), ("sae", "sae"), ("zero", "zero")):
                    sums[f"ce_{name}"] = sums.get(f"ce_{name}", 0.0) - float(lp[k][target])
                for k in ("sae", "zero"):
                    kl = float((lp[None].exp() * (lp[None] - lp[k])).sum())
                    sums[f"kl_{k}"] = sums.get(f"kl_{k}", 0.0) + kl
                count += 1
    finally:
        for layer in range(L):
            del model.model.layers[layer].mlp.forward  # the class's own forward again
    means = {k: v / count for k, v in sums.items()}
    spliced_fvu = []
    for layer in range(L):
        rows = spliced_rows[layer]
        mean = [sum(r[j] for r in rows) / len(rows) for j in range(D)]
        var = sum((r[j] - mean[j]) ** 2 for r in rows for j in range(D))
        spliced_fvu.append(spliced_err[layer] / var)
    return means, count, spliced_fvu


def test_replacement_equals_a_plain_per_token_computation(model):
    clt, batches = Weights(), make_batches()
    got = replacement_eval(model, clt.layered(), batches, token_filter=FILTER)
    ref, count, spliced_fvu = reference(model, clt, batches)
    assert got.splice.n_tokens == count
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
        assert getattr(got.splice, key) == pytest.approx(ref[key], rel=1e-4), key
    ce_score = (ref["ce_zero"] - ref["ce_sae"]) / (ref["ce_zero"] - ref["ce_clean"])
    assert got.splice.ce_score == pytest.approx(ce_score, rel=1e-3)
    for layer in range(L):
        assert got.layers[layer].spliced_fvu == pytest.approx(spliced_fvu[layer], rel=1e-4)
    # the spliced forward differs from the clean one: later layers read replaced residuals
    assert got.layers[2].spliced_fvu != pytest.approx(got.layers[2].fvu, rel=1e-3)
    assert got.splice.kl_sae > 0.01 and got.splice.ce_zero > got.splice.ce_clean + 0.05


def test_clean_pass_gives_per_target_fvu_and_per_layer_l0(model):
    """The offline metrics: codes and predictions from the clean inputs against the clean
    targets, by plain loops over the harvested tokens."""
    clt, batches = Weights(seed=1), make_batches()
    got = replacement_eval(model, clt.layered(), batches, token_filter=FILTER)
    harvester = Harvester(model, INPUTS + TARGETS, token_filter=FILTER)
    acts = [harvester(ids, mask) for ids, mask in batches]
    xs = [[r for a in acts for r in a[h].double().tolist()] for h in INPUTS]
    ys = [[r for a in acts for r in a[h].double().tolist()] for h in TARGETS]
    n = len(ys[0])
    assert (
        got.whole.n_tokens == got.splice.n_spliced == n == 2 * 9 - 3 - 2 + 5
    )  # BOS x3, padding x2
    errs, vars_, l0s, dead = [], [], [], 0
    for t in range(L):
        preds = [
            clt.token_prediction(t, [xs[layer][i] for layer in range(t + 1)]) for i in range(n)
        ]
        mean = [sum(r[j] for r in ys[t]) / n for j in range(D)]
        err = sum((p[j] - y[j]) ** 2 for p, y in zip(preds, ys[t], strict=True) for j in range(D))
        var = sum((y[j] - mean[j]) ** 2 for y in ys[t] for j in range(D))
        assert got.layers[t].fvu == pytest.approx(err / var, rel=1e-4)
        errs.append(err)
        vars_.append(var)
        pre = [
            [
                float(clt.b_enc[t, i])
                + sum(x[k] / float(clt.scale[t]) * float(clt.W_enc[t, i, k]) for k in range(D))
                for i in range(M)
            ]
            for x in xs[t]
        ]
        l0 = sum(sum(1 for v in row if v > 0) for row in pre) / n
        assert got.layers[t].l0 == pytest.approx(l0)
        never = sum(1 for i in range(M) if all(row[i] <= 0 for row in pre))
        assert got.layers[t].dead_fraction == pytest.approx(never / M)
        assert never >= 3  # the planted dead latents
        l0s.append(l0)
        dead += never
        assert (got.layers[t].name, got.layers[t].input_hook) == (TARGETS[t], INPUTS[t])
    assert got.whole.fvu == pytest.approx(sum(errs) / sum(vars_), rel=1e-4)
    assert got.splice.fvu == got.whole.fvu
    assert got.whole.l0 == pytest.approx(sum(l0s))
    assert got.whole.dead_fraction == pytest.approx(dead / (L * M))


def test_a_replacement_by_the_true_mlps_is_perfect(model):
    """Codes = the inputs, predictions = the model's own MLPs on them: the replacement model is
    the model (any input read from the wrong pass or layer would change it)."""
    mlps = [model.model.layers[layer].mlp for layer in range(L)]

    def run(x):
        xs = x.view(-1, L, D)  # .forward: not through the hooks
        return x, torch.cat([mlps[t].forward(xs[:, t]) for t in range(L)], -1)

    exact = LayeredDictionary(INPUTS, TARGETS, D, [D] * L, D, run)
    got = replacement_eval(model, exact, make_batches(), token_filter=FILTER)
    assert got.splice.ce_sae == pytest.approx(got.splice.ce_clean, abs=1e-6)
    assert got.splice.kl_sae == pytest.approx(
        0.0, abs=1e-6
    ) and got.splice.kl_score == pytest.approx(1.0)
    assert got.splice.ce_score == pytest.approx(1.0, abs=1e-4)
    assert all(p.fvu < 1e-10 and p.spliced_fvu < 1e-10 for p in got.layers)


def test_an_input_after_its_target_is_refused(model):
    late = Weights().layered(INPUTS[1:] + ["model.norm"])
    with pytest.raises(
        ValueError, match="input hook model.layers.1.mlp:input of layer 0 had not fired"
    ):
        replacement_eval(model, late, make_batches(), token_filter=FILTER)


ACTIVATIONS = [
    {"kind": "relu"},
    {"kind": "topk", "k": 3},
    {"kind": "batchtopk", "k": 3},
    {"kind": "jumprelu"},
    {"kind": "abstopk", "k": 3},
]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a["kind"])
def test_every_clt_activation_is_layer_separable_at_inference(activation):
    """What the spliced pass relies on: target t's prediction from the inputs of layers 0..t,
    later layers' inputs zeroed, is the prediction from every input."""
    clt = LayeredDictionary.of(Weights(seed=2).clt(activation=activation))
    g = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(7, L * D, generator=g) + 0.5
    code, full = clt.run(x)
    assert int((code.to_dense() if hasattr(code, "to_dense") else code).ne(0).sum()) > 0
    for t in range(L):
        padded = x.clone()
        padded[:, (t + 1) * D :] = 0
        assert torch.allclose(clt.target(clt.run(padded)[1], t), clt.target(full, t), atol=1e-6)


def test_the_spliced_pass_encodes_each_layer_once(model, monkeypatch):
    """Per batch the clean pass runs the CLT once (its L encoders) and the spliced pass encodes
    each layer once, in layer order: 2·L layer encodings, where running the whole CLT for each
    target took L + L·L. The scores are those of the L runs (a dictionary given only as
    ``run`` still takes that way)."""
    import saekit.kernels.layered as layered
    import saekit.model.clt_layers as clt_layers

    clt, batches = Weights(), make_batches()
    rerun = dataclasses.replace(clt.layered(), layer_by_layer=None)
    slow = replacement_eval(model, rerun, batches, token_filter=FILTER)

    encoders, layers_read = [], []
    init, encode_layer = layered.LayerPreacts.__init__, clt_layers.encode_layer

    def counting_init(self, x, W_enc, b_enc, owner=None):
        encoders.append(W_enc.shape[0])  # the layers whose encoders this pre-activation runs
        init(self, x, W_enc, b_enc, owner)

    def counting_encode_layer(clt, layer, x):
        layers_read.append(layer)
        return encode_layer(clt, layer, x)

    monkeypatch.setattr(layered.LayerPreacts, "__init__", counting_init)
    monkeypatch.setattr(clt_layers, "encode_layer", counting_encode_layer)
    got = replacement_eval(model, clt.layered(), batches, token_filter=FILTER)
    assert layers_read == list(range(L)) * len(batches)
    assert sum(encoders) == 2 * L * len(batches)
    for key in ("ce_sae", "kl_sae", "ce_score", "fvu"):
        assert getattr(got.splice, key) == pytest.approx(getattr(slow.splice, key), rel=1e-5)
    for ours, theirs in zip(got.layers, slow.layers, strict=True):
        assert ours.spliced_fvu == pytest.approx(theirs.spliced_fvu, rel=1e-5)
