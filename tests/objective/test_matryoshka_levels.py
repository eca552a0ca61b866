"""The fixed-level Matryoshka options (``matryoshka: {kind: fixed, detach_inner, level_k}``):
detached inner levels and decreasing K across levels, each against a float64 reference written
plainly here (one decode per level, the selection by a Python loop, the stop-gradient by an
explicit ``.detach()``), in value and gradient, on trap inputs (scale s ≠ 1, b_dec ≠ 0, data
mean ≠ 0, a 3-D batch: test_losses.make_sae); their off values reproduce the plain loss exactly,
and the matryoshka_auxk revival is unchanged by either (docs/design.md, "Matryoshka levels")."""

from __future__ import annotations

import pytest
import torch
from test_losses import (
    B,
    D,
    K,
    M,
    T,
    all_grads,
    float64_twin,
    make_sae,
    no_host_sync,
    plain_pre,
)

from saekit.core.encoding import as_dense
from saekit.kernels.prefix import prefix_mse
from saekit.objective.config import (
    FixedPrefixes,
    MatryoshkaAuxKRevival,
    MatryoshkaConfig,
    NoRevival,
)
from saekit.objective.matryoshka import (
    fixed_prefixes,
    level_code,
    level_reconstruction_loss,
    matryoshka_reconstruction_loss,
)
from saekit.objective.terms import MatryoshkaAuxK, TermInputs, build_objective

GROUPS = [6, 10, 24]
PREFIXES = fixed_prefixes(GROUPS)  # [6, 16, 40]
LEVEL_K = [1, 2, K]
N = B * T
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
CASES = {  # activation, kernel, per-token selection
    "topk sparse": ("topk", "torch", True),
    "topk dense": ("topk", "reference", True),
    "batchtopk sparse": ("batchtopk", "torch", False),
    "batchtopk dense": ("batchtopk", "reference", False),
    "abstopk sparse": ("abstopk", "torch", True),
    "abstopk dense": ("abstopk", "reference", True),
}


def case(name):
    activation, kernel, per_token = CASES[name]
    fields = {"k": K, "kernel": kernel}
    sae, x = make_sae(activation, **fields)
    sae.train()
    return sae, x, per_token


def reference_selection(z_NM: torch.Tensor, end: int, k: int, per_token: bool) -> torch.Tensor:
    """[N, M] bool: the k largest |z| below ``end`` of each token, or the k·N of the batch."""
    keep = torch.zeros(z_NM.shape, dtype=torch.bool)
    if per_token:
        for n in range(z_NM.shape[0]):
            order = sorted(range(end), key=lambda i: -abs(float(z_NM[n, i])))
            keep[n, order[:k]] = True
    else:
        entries = [(n, i) for n in range(z_NM.shape[0]) for i in range(end)]
        entries.sort(key=lambda e: -abs(float(z_NM[e])))
        for n, i in entries[: k * z_NM.shape[0]]:
            keep[n, i] = True
    return keep


def tilted_reference(errors_N: torch.Tensor, tilt: float) -> torch.Tensor:
    """TERM written out (arXiv 2007.01162, saekit's unit-free form): m/t · log((1/N) Σ_n
    exp(t·ℓ_n/m)), m the mean error as a Python float (detached); the plain mean at t = 0."""
    if tilt == 0:
        return errors_N.mean()
    m = float(errors_N.detach().mean())
    return m / tilt * torch.log(torch.exp(tilt * errors_N / m).mean())


def reference_loss(twin, x, level_k, detach_inner, per_token, tilt=0.0):
    """(1/P) Σ_j mean_n ‖x_n − b_dec − [sg](Σ_{S_j, i<p_{j−1}} z_i W_i) − Σ_{S_j, i≥p_{j−1}}‖²,
    in float64 on the twin, z = pre on the code's entries (the activation's selection); with
    ``tilt``, each level's mean over tokens is its tilted mean."""
    pre = plain_pre(twin, x)
    code = as_dense(twin(x.double()).latents).detach().reshape(N, M)
    z = pre * (code != 0)
    x_n = x.reshape(-1, D).double() / twin.scale
    total = torch.zeros((), dtype=torch.float64)
    for j, end in enumerate(PREFIXES):
        start = PREFIXES[j - 1] if j else 0
        keep = reference_selection(z.detach(), end, level_k[j], per_token)
        inner = (z * (keep & (torch.arange(M) < start))) @ twin.W_dec
        own = (z * (keep & (torch.arange(M) >= start))) @ twin.W_dec
        if detach_inner:
            inner = inner.detach()
        errors_N = (x_n - twin.b_dec - inner - own).pow(2).sum(-1)
        total = total + tilted_reference(errors_N, tilt)
    return total / len(PREFIXES)


def term_loss(sae, x, cfg: FixedPrefixes, tilt: float = 0.0):
    objective = build_objective(
        type(sae.activation), None, NoRevival(), reconstruction_tilt=tilt, matryoshka_cfg=cfg
    )
    out = sae(x)
    dead = torch.zeros(M, dtype=torch.bool)
    return objective.terms[0](TermInputs(sae, out, dead, torch.tensor(0.0), PREFIXES))


def check_against_reference(name, level_k, detach_inner, tilt=0.0):
    sae, x, per_token = case(name)
    twin = float64_twin(sae)
    twin.train()
    cfg = FixedPrefixes(groups=GROUPS, detach_inner=detach_inner, level_k=level_k)
    loss = term_loss(sae, x, cfg, tilt)
    loss.backward()
    ref = reference_loss(twin, x, level_k or [K] * len(GROUPS), detach_inner, per_token, tilt)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    got = all_grads(*(getattr(sae, n) for n in NAMES))
    want = all_grads(*(getattr(twin, n) for n in NAMES))
    for n, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=n)
    return loss, got


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("level_k", [None, LEVEL_K], ids=["full", "level_k"])
def test_level_options_equal_the_float64_reference_in_value_and_gradient(
    name, detach_inner, level_k
):
    check_against_reference(name, level_k, detach_inner)


@pytest.mark.parametrize("name", ["topk sparse", "batchtopk dense"])
@pytest.mark.parametrize("detach_inner", [False, True])
@pytest.mark.parametrize("level_k", [None, LEVEL_K], ids=["full", "level_k"])
def test_the_level_options_compose_with_a_tilted_reconstruction(name, detach_inner, level_k):
    """reconstruction_tilt with detach_inner and/or level_k: each level's tokens tilted on
    their own, the stop-gradient and the selection as without the tilt (both saekit paths: the
    tilted running sum, and the per-level decode of level_k)."""
    tilted, got = check_against_reference(name, level_k, detach_inner, tilt=1.5)
    plain, want = check_against_reference(name, level_k, detach_inner)
    assert tilted.item() > plain.item()  # t > 0: above the mean (the levels' errors vary)
    assert any(not torch.allclose(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("name", ["topk sparse", "batchtopk sparse"])
def test_each_option_changes_the_gradients_not_the_full_code(name):
    _, plain = check_against_reference(name, None, False)
    _, detached = check_against_reference(name, None, True)
    _, fewer = check_against_reference(name, LEVEL_K, False)
    for g_plain, g_detached, g_fewer in zip(plain, detached, fewer, strict=True):
        if g_plain.abs().max() > 0:
            assert not torch.equal(g_plain, g_detached)
            assert not torch.equal(g_plain, g_fewer)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("detach_inner", [False, True])
def test_level_k_of_the_full_k_everywhere_is_the_plain_matryoshka_loss(name, detach_inner):
    """k_j = k: every level keeps all of its prefix's entries (a token has at most k; the batch
    k·N), so the per-level decodes give the one-pass loss in value and gradient."""
    sae, x, _ = case(name)
    out = sae(x)
    codes = [sae.activation.level_code(out.latents, end, K) for end in PREFIXES]
    levels = level_reconstruction_loss(out.x_n, codes, sae.W_dec, sae.b_dec, PREFIXES, detach_inner)
    got = torch.autograd.grad(levels, [getattr(sae, n) for n in NAMES])
    out = sae(x)
    one_pass = matryoshka_reconstruction_loss(
        out.x_n, out.latents, sae.W_dec, sae.b_dec, PREFIXES, detach_inner=detach_inner
    )
    want = torch.autograd.grad(one_pass, [getattr(sae, n) for n in NAMES])
    assert levels.item() == pytest.approx(one_pass.item(), rel=1e-6)
    for n, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", CASES)
def test_level_code_keeps_the_reference_selection(name):
    sae, x, per_token = case(name)
    out = sae(x)
    z = as_dense(out.latents).detach()
    for end, k in zip(PREFIXES, LEVEL_K, strict=True):
        kept = as_dense(level_code(out.latents, end, k, per_token)).detach()
        want = reference_selection(z, end, k, per_token)
        assert torch.equal(kept, torch.where(want, z, torch.zeros_like(z)))
        per = (kept != 0).sum(1) if per_token else (kept != 0).sum().reshape(1)
        assert per.max() <= (k if per_token else k * N)


@pytest.mark.parametrize("per_token", [True, False])
def test_level_code_of_a_prefix_with_fewer_entries_than_k_keeps_them_all(per_token):
    z = torch.zeros(3, 8)
    z[0, 1], z[1, 6], z[2, 0] = 2.0, 3.0, -1.0
    kept = level_code(z, 4, 5, per_token)
    want = z.clone()
    want[1, 6] = 0.0  # past the prefix
    assert torch.equal(kept, want)


@pytest.mark.parametrize("grad_weights", [[1.0, 1.0, 1.0, 1.0], [0.5, -2.0, 3.0, 0.25]])
def test_prefix_mse_detach_inner_is_autograd_of_the_detached_running_sum(grad_weights):
    """∂/∂δ_j = −(2/N)·g_j e_j and ∂/∂r = (2/N)·Σ_j g_j e_j: autograd of the float64 loop
    mse_j = mean_n ‖r − sg(Σ_{j'<j} δ_j') − δ_j‖², with non-uniform upstream weights g_j."""
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(4, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    r = (torch.randn(7, 3, generator=g, dtype=torch.float64) + 2.0).requires_grad_()
    weights = torch.tensor(grad_weights, dtype=torch.float64)
    got = prefix_mse(delta, r, detach_inner=True)
    got_grads = torch.autograd.grad((got * weights).sum(), [delta, r])
    mses, inner = [], torch.zeros_like(r)
    for j in range(4):
        mses.append((r - inner.detach() - delta[j]).pow(2).sum(-1).mean())
        inner = inner + delta[j]
    want = torch.stack(mses)
    want_grads = torch.autograd.grad((want * weights).sum(), [delta, r])
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    plain = prefix_mse(delta, r)
    assert torch.equal(plain, got)  # the values are the plain ones


@pytest.mark.parametrize("dead_where", ["none", "all", "inner"])
def test_matryoshka_auxk_reads_the_full_code_whatever_the_level_options(dead_where):
    """The decision: the revival's residual of level j is the full prefix code's (what the
    prefix's latents cannot explain), not level_k's (whose dropped entries are live latents);
    it is detached, so detach_inner changes nothing either."""
    sae, x = make_sae("batchtopk", k=K)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[{"none": slice(0, 0), "all": slice(None), "inner": slice(0, 16)}[dead_where]] = True
    values, grads = [], []
    for cfg in (FixedPrefixes(groups=GROUPS),
                FixedPrefixes(groups=GROUPS, detach_inner=True, level_k=LEVEL_K)):  # fmt: skip
        objective = build_objective(
            type(sae.activation), None, MatryoshkaAuxKRevival(), matryoshka_cfg=cfg
        )
        out = sae(x)
        revival = next(t for t in objective.terms if isinstance(t, MatryoshkaAuxK))
        value = revival(TermInputs(sae, out, dead, torch.tensor(0.0), PREFIXES))
        values.append(value)
        grads.append(torch.autograd.grad(value, [sae.W_enc, sae.W_dec], allow_unused=True))
    assert torch.equal(values[0], values[1])
    assert (values[0].item() == 0) == (dead_where == "none")
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_off_values_are_the_plain_reconstruction_exactly():
    sae, x = make_sae("batchtopk", k=K)
    out = sae(x)
    inputs = TermInputs(sae, out, torch.zeros(M, dtype=torch.bool), torch.tensor(0.0), PREFIXES)
    parsed = MatryoshkaConfig.parse(
        {"kind": "fixed", "groups": GROUPS, "detach_inner": False, "level_k": None}, "m"
    )
    off = build_objective(type(sae.activation), None, NoRevival(), matryoshka_cfg=parsed).terms[0](
        inputs
    )
    off_grads = torch.autograd.grad(off, [sae.W_enc, sae.W_dec, sae.b_dec])
    out = sae(x)
    plain = matryoshka_reconstruction_loss(out.target(), out.latents, sae.W_dec, sae.b_dec,
                                           PREFIXES)  # fmt: skip
    plain_grads = torch.autograd.grad(plain, [sae.W_enc, sae.W_dec, sae.b_dec])
    assert torch.equal(off, plain)
    for a, b in zip(off_grads, plain_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "matryoshka, match",
    [
        ({"kind": "random", "detach_inner": True}, "detach_inner"),
        ({"kind": "random", "level_k": [1, 4]}, "level_k"),
        ({"kind": "fixed", "groups": GROUPS, "level_k": [1, 4]}, "3 positive integers"),
        ({"kind": "fixed", "groups": GROUPS, "level_k": [2, 1, 4]}, "non-decreasing"),
        ({"kind": "fixed", "groups": GROUPS, "level_k": [0, 1, 4]}, "positive"),
        ({"kind": "fixed", "groups": GROUPS, "level_k": [1, 2, 3]}, "end with sae.activation.k"),
        ({"kind": "fixed", "groups": GROUPS, "detach_inner": "yes"}, "expected bool"),
    ],
)
def test_unsupported_level_options_are_refused_in_one_line(matryoshka, match):
    from saekit.train.member_config import SAETrainConfig

    sae = {"d_in": D, "d_sae": M, "activation": {"kind": "batchtopk", "k": K}}
    with pytest.raises(ValueError, match=match) as err:
        SAETrainConfig(sae=sae, name="m", matryoshka=matryoshka).validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("activation", [{"kind": "relu"}, {"kind": "matching_pursuit", "k": K}])
def test_level_k_is_refused_for_an_activation_without_its_k_largest(activation):
    from saekit.train.member_config import SAETrainConfig

    sae = {"d_in": D, "d_sae": M, "activation": activation}
    cfg = SAETrainConfig(
        sae=sae,
        name="m",
        penalty={"kind": "l1", "coefficient": 1.0} if activation["kind"] == "relu" else None,
        matryoshka={"kind": "fixed", "groups": GROUPS, "level_k": LEVEL_K},
    )
    with pytest.raises(ValueError, match="level_k needs an activation"):
        cfg.validate()


@pytest.mark.parametrize("name", ["topk sparse", "batchtopk sparse"])
def test_the_level_options_do_not_sync_with_the_host(name):
    sae, x, _ = case(name)
    cfg = FixedPrefixes(groups=GROUPS, detach_inner=True, level_k=LEVEL_K)
    objective = build_objective(type(sae.activation), None, NoRevival(), matryoshka_cfg=cfg)
    out = sae(x)
    inputs = TermInputs(sae, out, torch.zeros(M, dtype=torch.bool), torch.tensor(0.0), PREFIXES)
    with no_host_sync():
        loss = objective.terms[0](inputs)
        loss.backward()
