"""Specification tests of `SAE` (DESIGN.md, sections Forward and Activations).

Every expected value is computed here, independently and plainly: Python floats (float64), loops
over tokens and latents at small sizes, closed forms. The traps are on every input: nonzero data
mean (x = 5·randn + 3), dataset scale s ≠ 1, nonzero random b_dec and b_enc, W_enc untied from
W_dec, 2-D and 3-D inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from saekit.activations.batchtopk import BatchTopKConfig
from saekit.activations.jumprelu import JumpReLUConfig
from saekit.activations.prolu import ProLUConfig
from saekit.activations.relu import ReLUConfig
from saekit.activations.topk import TopKConfig
from saekit.core.encoding import SparseCode
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

D_IN, D_SAE, K = 8, 16, 3

# variant -> (activation config, training mode). The TopK family runs on both training paths:
# kernel "torch" (sparse fast path) and "reference" (dense autograd).
VARIANTS = {
    "relu": ("relu", True),
    "topk": ({"kind": "topk", "k": K}, True),
    "topk-reference": ({"kind": "topk", "k": K, "kernel": "reference"}, True),
    "topk-eval": ({"kind": "topk", "k": K}, False),
    "batchtopk-train": ({"kind": "batchtopk", "k": K}, True),
    "batchtopk-train-reference": ({"kind": "batchtopk", "k": K, "kernel": "reference"}, True),
    "batchtopk-eval": ({"kind": "batchtopk", "k": K}, False),
    "jumprelu": ({"kind": "jumprelu"}, True),
    "prolu-ste": ({"kind": "prolu", "variant": "ste"}, True),
    "prolu-relu": ({"kind": "prolu", "variant": "relu"}, True),
}
SPARSE_VARIANTS = {"topk", "topk-eval", "batchtopk-train"}
LEADS = {"2d": (6,), "3d": (2, 3)}


def make_data(*lead: int, seed: int) -> torch.Tensor:
    """Activations with a nonzero mean and a scale far from 1: 5·randn + 3, float64."""
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.randn(*lead, D_IN, generator=g, dtype=torch.float64) + 3


def make_sae(variant: str, dtype: str = "float64", seed: int = 0) -> SAE:
    """An SAE with every trap set: s ≠ 1, b_dec ≠ 0, b_enc ≠ 0, W_enc ≠ W_dec, live thresholds."""
    activation, training = VARIANTS[variant]
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, dtype=dtype, activation=activation))
    kind = sae.cfg.activation.kind
    sae.init_from_data(make_data(64, seed=seed + 100))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_SAE, D_IN) / math.sqrt(D_IN))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN) / math.sqrt(D_IN))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE))
        sae.b_dec.add_(0.5 * torch.randn(D_IN))
        act = sae.activation
        if kind == "jumprelu":
            act.threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 0.6))
        if kind == "prolu":
            act.bias.copy_(torch.empty(D_SAE).uniform_(-0.5, 0.5))
        if kind == "batchtopk":
            act.threshold.fill_(0.3)
            act.threshold_initialized.fill_(True)
    sae.train(training)
    assert abs(float(sae.scale) - 1.0) > 1.0  # the scale trap is armed
    assert sae.b_dec.abs().min() > 0
    return sae


def reference_activation(sae: SAE, pre: list[list[float]]) -> list[list[float]]:
    """σ(pre) by the DESIGN.md formulas, one latent at a time."""
    cfg, act = sae.cfg.activation, sae.activation
    n_tokens, M = len(pre), len(pre[0])
    if cfg.kind == "relu":
        return [[max(p, 0.0) for p in row] for row in pre]
    if cfg.kind == "topk":
        z = []
        for row in pre:
            kept = sorted(range(M), key=lambda i: row[i], reverse=True)[: cfg.k]
            z.append([max(row[i], 0.0) if i in kept else 0.0 for i in range(M)])
        return z
    if cfg.kind == "batchtopk" and sae.training:
        flat = sorted(
            ((n, i) for n in range(n_tokens) for i in range(M)),
            key=lambda ni: pre[ni[0]][ni[1]],
            reverse=True,
        )
        kept = set(flat[: cfg.k * n_tokens])
        return [
            [max(pre[n][i], 0.0) if (n, i) in kept else 0.0 for i in range(M)]
            for n in range(n_tokens)
        ]
    if cfg.kind == "batchtopk":
        theta = float(act.threshold)
        return [[p if p > theta else 0.0 for p in row] for row in pre]
    if cfg.kind == "jumprelu":
        theta = act.theta().tolist()
        return [[row[i] if row[i] > theta[i] else 0.0 for i in range(M)] for row in pre]
    if cfg.kind == "prolu":
        b = act.bias.tolist()
        return [
            [row[i] if row[i] + b[i] > 0 and row[i] > 0 else 0.0 for i in range(M)] for row in pre
        ]
    raise AssertionError(cfg.kind)


def reference_forward(sae: SAE, x: torch.Tensor) -> dict[str, list[list[float]]]:
    """x_n = x/s; pre = (x_n − b_dec) W_encᵀ + b_enc (none for ProLU); x̂ = s·(z W_dec + b_dec)."""
    d, M = sae.cfg.d_in, sae.cfg.d_sae
    s = float(sae.scale)
    W_enc, W_dec = sae.W_enc.tolist(), sae.W_dec.tolist()
    b_enc, b_dec = sae.b_enc.tolist(), sae.b_dec.tolist()
    use_b_enc = sae.cfg.activation.kind != "prolu"
    x_n = [[v / s for v in row] for row in x.reshape(-1, d).tolist()]
    pre = [
        [
            sum((row[j] - b_dec[j]) * W_enc[i][j] for j in range(d))
            + (b_enc[i] if use_b_enc else 0.0)
            for i in range(M)
        ]
        for row in x_n
    ]
    z = reference_activation(sae, pre)
    x_hat_n = [
        [sum(zn[i] * W_dec[i][j] for i in range(M)) + b_dec[j] for j in range(d)] for zn in z
    ]
    x_hat = [[s * v for v in row] for row in x_hat_n]
    return {"x_n": x_n, "pre": pre, "z": z, "x_hat_n": x_hat_n, "x_hat": x_hat}


def t64(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def dense(latents: torch.Tensor | SparseCode) -> torch.Tensor:
    return latents.to_dense() if isinstance(latents, SparseCode) else latents


def close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    err = (actual.double() - expected.double()).norm()
    assert err <= tol * expected.double().norm(), f"relative error {err / expected.norm():.2e}"


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_float64_reference(variant, lead):
    sae = make_sae(variant)
    x = make_data(*lead, seed=1)
    ref = reference_forward(sae, x)
    out = sae(x)
    N = math.prod(lead)
    assert out.x_hat.shape == x.shape
    assert out.x_n.shape == (N, D_IN) and out.x_hat_n.shape == (N, D_IN)
    assert out.pre.shape == (N, D_SAE)
    close64(out.x_n, t64(ref["x_n"]))
    close64(out.pre, t64(ref["pre"]))
    close64(sae.pre_acts(out.x_n), t64(ref["pre"]))
    # the sparse fast path (kernel "torch") gives a SparseCode; the reference path dense latents
    assert isinstance(out.latents, SparseCode) == (variant in SPARSE_VARIANTS)
    assert out.encoding.latents is out.latents
    close64(dense(out.latents), t64(ref["z"]))
    close64(out.x_hat_n, t64(ref["x_hat_n"]))
    close64(out.x_hat, t64(ref["x_hat"]).reshape(x.shape))
    # the reference is not degenerate: some latents are active and some are not
    z = t64(ref["z"])
    assert 0 < int((z != 0).sum()) < z.numel()


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_matches_float64_reference(variant, lead):
    sae = make_sae(variant)
    x = make_data(*lead, seed=2)
    z = sae.encode(x)
    assert z.shape == (*lead, D_SAE)
    close64(z, t64(reference_forward(sae, x)["z"]).reshape(*lead, D_SAE))


@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_matches_float64_reference(variant, lead):
    sae = make_sae(variant)
    g = torch.Generator().manual_seed(3)
    z = torch.relu(torch.randn(*lead, D_SAE, generator=g, dtype=torch.float64))
    s, W_dec, b_dec = float(sae.scale), sae.W_dec.tolist(), sae.b_dec.tolist()
    expected = [
        [s * (sum(zn[i] * W_dec[i][j] for i in range(D_SAE)) + b_dec[j]) for j in range(D_IN)]
        for zn in z.reshape(-1, D_SAE).tolist()
    ]
    x_hat = sae.decode(z)
    assert x_hat.shape == (*lead, D_IN)
    close64(x_hat, t64(expected).reshape(*lead, D_IN))


def test_decode_of_zero_latents_is_scaled_b_dec():
    sae = make_sae("relu")
    x_hat = sae.decode(torch.zeros(2, 3, D_SAE, dtype=torch.float64))
    close64(x_hat, (float(sae.scale) * sae.b_dec.detach()).expand(2, 3, D_IN))


def test_decode_n_of_a_sparse_code_equals_dense_decode():
    sae = make_sae("topk")
    code = sae(make_data(2, 3, seed=4)).latents
    assert isinstance(code, SparseCode)
    z = code.to_dense().tolist()
    W_dec, b_dec = sae.W_dec.tolist(), sae.b_dec.tolist()
    expected = [
        [sum(zn[i] * W_dec[i][j] for i in range(D_SAE)) + b_dec[j] for j in range(D_IN)] for zn in z
    ]
    close64(sae.decode_n(code), t64(expected))
    close64(sae.decode_n(code), sae.decode_n(code.to_dense()))


def test_sparse_and_dense_decode_give_the_same_gradients():
    sae = make_sae("topk")
    code = sae(make_data(6, seed=5)).latents
    g = torch.randn(6, D_IN, dtype=torch.float64)
    values = code.values.detach().requires_grad_(True)
    sparse = SparseCode(values, code.latent, code.token, code.n_tokens, code.d_sae)
    grads_sparse = torch.autograd.grad((sae.decode_n(sparse) * g).sum(), (values, sae.W_dec))
    grads_dense = torch.autograd.grad(
        (sae.decode_n(sparse.to_dense()) * g).sum(), (values, sae.W_dec)
    )
    for a, b in zip(grads_sparse, grads_dense, strict=True):
        close64(a, b)


def test_prolu_ignores_b_enc_and_trains_its_own_bias():
    sae = make_sae("prolu-ste")
    assert sae.b_enc.abs().min() > 0  # set, yet it must not enter pre
    out = sae(make_data(6, seed=6))
    (out.x_hat**2).sum().backward()
    assert sae.b_enc.grad is None and not sae.b_enc.requires_grad
    assert sae.activation.bias.grad is not None and sae.activation.bias.grad.abs().sum() > 0


def kink_margin(sae: SAE, pre: torch.Tensor) -> float:
    """Distance of the pre-activations to the nearest point where σ is not smooth."""
    cfg, act = sae.cfg.activation, sae.activation
    if cfg.kind == "jumprelu":
        return float((pre - act.threshold.detach()).abs().min())
    if cfg.kind == "prolu":
        return float(torch.minimum(pre.abs(), (pre + act.bias.detach()).abs()).min())
    margin = float(pre.abs().min())  # the ReLU kink
    if cfg.kind == "topk":  # a tie between the k-th and (k+1)-th largest of a token
        top = pre.sort(dim=-1, descending=True).values
        margin = min(margin, float((top[:, cfg.k - 1] - top[:, cfg.k]).min()))
    if cfg.kind == "batchtopk":  # a tie at the batch's k·N-th largest
        top = pre.reshape(-1).sort(descending=True).values
        n_kept = cfg.k * pre.shape[0]
        margin = min(margin, float(top[n_kept - 1] - top[n_kept]))
    return margin


GRADCHECK_VARIANTS = [
    "relu",
    "topk",
    "topk-reference",
    "batchtopk-train",
    "batchtopk-train-reference",
    "jumprelu",
    "prolu-relu",  # the "ste" variant's gradient is deliberately not the true one
]


@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS)
def test_forward_gradcheck_in_x_and_every_shared_parameter(variant):
    """Smooth where σ is (margins to every kink asserted first): the gradients of x̂ with respect
    to x, W_enc, b_enc, W_dec and b_dec are the true ones, on the sparse fast path as well."""
    sae = make_sae(variant)
    x = make_data(2, 3, seed=7).requires_grad_(True)
    pre = sae(x).pre.detach()
    assert kink_margin(sae, pre) > 1e-4
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    # gradcheck perturbs its inputs in place, so passing the parameters perturbs the SAE
    assert torch.autograd.gradcheck(lambda x_, *_: sae(x_).x_hat, (x, *params))


def test_decode_gradcheck_in_z_and_W_dec():
    sae = make_sae("relu")
    z = torch.randn(2, 3, D_SAE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z_, W_: sae.decode(z_), (z, sae.W_dec))


# ------------------------------------------------------------------------------ input errors


@pytest.mark.parametrize("bad, word", [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
@pytest.mark.parametrize("lead", LEADS.values(), ids=LEADS.keys())
def test_encode_rejects_non_finite_activations(lead, bad, word):
    sae = make_sae("relu")
    x = make_data(*lead, seed=8)
    x.view(-1)[5] = bad
    with pytest.raises(ValueError, match=word):
        sae.encode(x)


@pytest.mark.parametrize("width", [D_IN - 1, D_IN + 1])
def test_encode_and_forward_reject_wrong_d_in(width):
    sae = make_sae("topk")
    x = torch.randn(2, 3, width, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(x)
    with pytest.raises(ValueError, match="d_in"):
        sae(x)


def test_decode_rejects_wrong_d_sae():
    with pytest.raises(ValueError, match="d_sae"):
        make_sae("relu").decode(torch.zeros(2, D_SAE + 1, dtype=torch.float64))


BAD_ACTIVATIONS = {
    "topk k > d_sae": ({"kind": "topk", "k": D_SAE + 1}, r"activation\.k = 17 exceeds d_sae = 16"),
    "batchtopk k > d_sae": ({"kind": "batchtopk", "k": D_SAE + 1}, r"activation\.k = 17 exceeds"),
    "config object k > d_sae": (TopKConfig(k=D_SAE + 1), r"activation\.k = 17 exceeds"),
    "k = 0": ({"kind": "topk", "k": 0}, r"activation: k must be a positive integer"),
    "k < 0": ({"kind": "topk", "k": -2}, r"activation: k must be a positive integer"),
    "batchtopk k = 0": ({"kind": "batchtopk", "k": 0}, r"k must be a positive integer"),
    "k a bool": ({"kind": "topk", "k": True}, r"activation\.k: expected int"),
    "k a fraction": ({"kind": "topk", "k": 2.5}, r"activation\.k: expected int"),
    "topk without k": ({"kind": "topk"}, r"activation: .*'k'"),
    "topk shorthand without k": ("topk", r"activation: .*'k'"),
    "batchtopk without k": ({"kind": "batchtopk"}, r"activation: .*'k'"),
    "unknown kind": ("gelu", r"activation\.kind: unknown activation 'gelu'; choose one of"),
    "unknown kind in a mapping": ({"kind": "gelu", "k": 3}, r"activation\.kind: unknown .*'gelu'"),
    "no kind": ({"k": 3}, r"activation: expected a activation kind or a mapping with 'kind'"),
    "field not of relu": ({"kind": "relu", "k": 3}, r"activation: \['k'\] .*not apply to .*'relu'"),
    "field not of topk": (
        {"kind": "topk", "k": 3, "threshold_beta": 0.9},
        r"\['threshold_beta'\] .*not apply to activation 'topk'",
    ),
    "field not of jumprelu": (
        {"kind": "jumprelu", "variant": "ste"},
        r"\['variant'\] .*not apply to activation 'jumprelu'",
    ),
    "old prolu field name": (
        {"kind": "prolu", "prolu_variant": "relu"},
        r"\['prolu_variant'\] .*not apply to activation 'prolu'",
    ),
    "prolu variant": ({"kind": "prolu", "variant": "sigmoid"}, r"variant must be one of"),
    "threshold_beta = 1": ({"kind": "batchtopk", "k": 3, "threshold_beta": 1.0}, "threshold_beta"),
    "threshold_beta nan": (
        {"kind": "batchtopk", "k": 3, "threshold_beta": math.nan},
        "threshold_beta",
    ),
    "kernel": ({"kind": "topk", "k": 3, "kernel": "cuda"}, r"kernel must be one of"),
    "bandwidth 0": ({"kind": "jumprelu", "bandwidth": 0.0}, r"bandwidth must be a finite number"),
    "init_threshold < 0": ({"kind": "jumprelu", "init_threshold": -1.0}, r"init_threshold must"),
    "init_threshold inf": ({"kind": "jumprelu", "init_threshold": math.inf}, r"init_threshold"),
}


@pytest.mark.parametrize("activation, message", BAD_ACTIVATIONS.values(), ids=BAD_ACTIVATIONS)
def test_bad_activation_config_is_refused_naming_the_field(activation, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation)


@pytest.mark.parametrize("field", ["k", "threshold_beta", "kernel", "prolu_variant"])
def test_old_flat_activation_fields_are_refused_by_from_dict_naming_them(field):
    data = {"d_in": D_IN, "d_sae": D_SAE, "activation": {"kind": "topk", "k": K}, field: 3}
    with pytest.raises(ValueError, match=rf"unknown field\(s\) \['{field}'\]"):
        SAEConfig.from_dict(data)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"d_sae": -1}, "d_sae must be a positive integer"),
        ({"dtype": "float17"}, "dtype"),
    ],
)
def test_bad_sizes_and_dtype_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, "activation": "relu", **fields})


ACTIVATION_FORMS = {
    # the same configuration written three ways: a kind name, a mapping, a config object
    "relu": ["relu", {"kind": "relu"}, ReLUConfig()],
    "topk": [{"kind": "topk", "k": K}, TopKConfig(k=K), TopKConfig(K, "torch")],
    "batchtopk": [
        {"kind": "batchtopk", "k": K, "threshold_beta": 0.9, "kernel": "reference"},
        BatchTopKConfig(k=K, threshold_beta=0.9, kernel="reference"),
    ],
    "jumprelu": [
        {"kind": "jumprelu", "init_threshold": 0.02, "bandwidth": 0.005},
        JumpReLUConfig(init_threshold=0.02, bandwidth=0.005),
    ],
    "prolu": [{"kind": "prolu", "variant": "relu"}, ProLUConfig(variant="relu")],
}


@pytest.mark.parametrize("kind", ACTIVATION_FORMS)
def test_activation_config_forms_agree_and_round_trip_through_plain_data(kind):
    cfgs = [
        SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=form, hook="h", metadata={"a": 1})
        for form in ACTIVATION_FORMS[kind]
    ]
    for cfg in cfgs:
        assert cfg == cfgs[0]
        assert cfg.activation.kind == kind
        data = cfg.to_dict()
        assert data["activation"]["kind"] == kind
        assert SAEConfig.from_dict(data) == cfg
        assert SAEConfig.from_dict(json.loads(json.dumps(data))) == cfg
        # every activation field is written out, defaults included
        assert set(data["activation"]) == {"kind"} | set(vars(cfg.activation))
    assert type(SAE(cfgs[0]).activation).config_class.kind == kind


# ------------------------------------------------------------------------------ init_from_data


def test_init_from_data_sets_scale_so_normalised_norm_is_d_and_b_dec_to_the_mean():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu", dtype="float64"))
    x = make_data(4, 10, seed=9)  # 3-D, nonzero mean
    sae.init_from_data(x)
    rows = x.reshape(-1, D_IN).tolist()
    N = len(rows)
    expected_s = math.sqrt(sum(sum(v * v for v in row) for row in rows) / N / D_IN)
    s = float(sae.scale)
    assert s == pytest.approx(expected_s, rel=1e-6)
    mean_sq_norm = sum(sum((v / s) ** 2 for v in row) for row in rows) / N
    assert mean_sq_norm == pytest.approx(D_IN, rel=1e-5)
    expected_b_dec = [sum(row[j] / s for row in rows) / N for j in range(D_IN)]
    torch.testing.assert_close(sae.b_dec.detach(), t64([expected_b_dec])[0], rtol=1e-6, atol=1e-9)


def test_init_from_data_uses_a_given_scale():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu", dtype="float64"))
    x = make_data(20, seed=10)
    sae.init_from_data(x, scale=2.5)
    assert float(sae.scale) == 2.5
    close64(sae.b_dec.detach(), (x / 2.5).mean(0))


def test_init_from_data_geometric_median_beats_the_mean_with_outliers():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu", dtype="float64"))
    x = make_data(60, seed=11)
    x[:6] += 200.0  # outliers drag the mean, not the median
    sae.init_from_data(x, method="geometric_median")
    x_n = (x / float(sae.scale)).tolist()

    def total_distance(c: list[float]) -> float:
        return sum(math.sqrt(sum((row[j] - c[j]) ** 2 for j in range(D_IN))) for row in x_n)

    c = sae.b_dec.tolist()
    mean = [sum(row[j] for row in x_n) / len(x_n) for j in range(D_IN)]
    assert total_distance(c) < 0.9 * total_distance(mean)
    # optimality: the (sub)gradient Σ (x − c)/‖x − c‖ vanishes at the geometric median
    grad = [0.0] * D_IN
    for row in x_n:
        dist = math.sqrt(sum((row[j] - c[j]) ** 2 for j in range(D_IN)))
        for j in range(D_IN):
            grad[j] += (row[j] - c[j]) / dist
    assert math.sqrt(sum(v * v for v in grad)) < 1e-3 * len(x_n)


def test_init_from_data_rejects_an_unknown_method():
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="relu"))
    with pytest.raises(ValueError, match="geometric_median"):
        sae.init_from_data(make_data(10, seed=12), method="median")


# ------------------------------------------------------------------------------ decoder helpers


def test_remove_parallel_grad_leaves_each_row_gradient_orthogonal_to_the_row():
    sae = make_sae("topk")  # W_dec rows are not unit norm here
    G = torch.randn(D_SAE, D_IN, dtype=torch.float64)
    sae.W_dec.grad = G.clone()
    sae.remove_parallel_grad_()
    W, G_list = sae.W_dec.tolist(), G.tolist()
    for i in range(D_SAE):
        w, g = W[i], G_list[i]
        coef = sum(a * b for a, b in zip(g, w, strict=True)) / sum(a * a for a in w)
        expected = [g[j] - coef * w[j] for j in range(D_IN)]
        close64(sae.W_dec.grad[i], t64([expected])[0])
        assert abs(float(sae.W_dec.grad[i] @ sae.W_dec[i].detach())) < 1e-12


def test_normalize_decoder_gives_unit_rows_with_unchanged_directions():
    sae = make_sae("topk")
    W = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    close64(sae.W_dec.norm(dim=-1), torch.ones(D_SAE, dtype=torch.float64))
    close64(sae.W_dec.detach() * W.norm(dim=-1, keepdim=True), W)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", ["relu", "topk", "batchtopk-train", "jumprelu", "prolu-ste"])
def test_tied_init_has_W_enc_equal_W_dec_with_unit_rows_and_zero_biases(variant, dtype):
    torch.manual_seed(13)
    activation = VARIANTS[variant][0]
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, dtype=dtype))
    assert torch.equal(sae.W_enc, sae.W_dec)
    norms = sae.W_dec.double().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=1e-6)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.W_dec.std() > 0  # random, not a constant
    assert float(sae.scale) == 1.0


# ------------------------------------------------------------------------------ scale folding


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_scale_leaves_latents_and_reconstruction_unchanged(variant):
    sae = make_sae(variant, dtype="float32")
    s = float(sae.scale)
    x = make_data(2, 3, seed=14).float()
    W_enc, W_dec = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    b_enc, b_dec = sae.b_enc.detach().clone(), sae.b_dec.detach().clone()
    act_state = {k: v.clone() for k, v in sae.activation.state_dict().items()}
    before = sae(x)
    z_before = sae.encode(x)

    sae.fold_scale_()

    assert float(sae.scale) == 1.0
    torch.testing.assert_close(sae.W_enc.detach(), W_enc / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(sae.W_dec.detach(), W_dec * s, rtol=1e-6, atol=0)
    torch.testing.assert_close(sae.b_dec.detach(), b_dec * s, rtol=1e-6, atol=0)
    assert torch.equal(sae.b_enc, b_enc)
    for name, value in sae.activation.state_dict().items():  # thresholds, ProLU bias
        assert torch.equal(value, act_state[name]), name
    after = sae(x)
    assert_rel(after.pre, before.pre)
    assert_rel(dense(after.latents), dense(before.latents))
    assert_rel(after.x_hat, before.x_hat)
    assert_rel(sae.encode(x), z_before)
    assert (z_before != 0).any()


def test_remove_parallel_grad_keeps_small_fp16_rows_finite():
    """‖w‖² of a row of norm 1e-4 underflows to 0 in float16; the coefficients are computed in
    float32, so the projection stays finite and matches the float64 one."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=3, activation={"kind": "topk", "k": 1})).half()
    with torch.no_grad():
        sae.W_dec[1] *= 1e-4 / sae.W_dec[1].float().norm()
    G = torch.randn(3, 6).half()
    sae.W_dec.grad = G.clone()
    sae.remove_parallel_grad_()
    W64, G64 = sae.W_dec.detach().double(), G.double()
    expected = G64 - ((G64 * W64).sum(-1) / (W64 * W64).sum(-1)).unsqueeze(-1) * W64
    assert torch.isfinite(sae.W_dec.grad).all()
    torch.testing.assert_close(sae.W_dec.grad.double(), expected, rtol=1e-2, atol=1e-2)
