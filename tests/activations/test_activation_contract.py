"""The contract every registered activation keeps (issue 23), parametrized over ACTIVATIONS, so
an activation added to the registry is checked without touching this file:

- save folds the scale: the loaded SAE (s = 1) gives the same latents and reconstruction on raw
  input, and its own state (thresholds, extra parameters) is unchanged by the fold;
- save → load round trip: same config, same tensors as the folded copy;
- 3-D input [B, T, d] gives what the flattened [B·T, d] input gives (training and inference);
- the fast path equals the reference path wherever the activation has both (a ``kernel`` field);
- the objective by hand: the loss the objective computes (Member's terms, as ``train_step`` runs
  them) equals a float64 hand computation for that activation, every term and every gradient,
  at b_dec ≠ 0, data mean ≠ 0 and scale s ≠ 1 (arch_helpers' traps). The hand computations are
  the independent references written in test_objective.py and test_arch_*.py; a new activation
  fails :func:`test_every_activation_has_a_hand_objective` until its reference is written.

The example config of each kind is built from its config class: required fields (no default)
take the value in :data:`REQUIRED_FIELDS` (a new required field fails loudly, naming itself).
"""

from __future__ import annotations

import dataclasses

import pytest
import test_arch_abstopk as abstopk_proof
import test_arch_gated as gated_proof
import test_arch_hierarchical_topk as htopk_proof
import test_arch_matching_pursuit as mp_proof
import test_objective as objective_proof
import torch
from arch_helpers import (
    D,
    assert_same_gradients,
    data,
    dead_mask,
    leaves,
    make_member,
    round_trip,
    saekit_loss,
)

from saekit.activations import ACTIVATIONS
from saekit.core.encoding import as_dense
from saekit.model.sae import SAE

KINDS = sorted(ACTIVATIONS)
REQUIRED_FIELDS = {"k": 3}
"""Example values of the config fields that have no default."""
LAM = 0.375


def example(kind: str, **fields) -> dict:
    """The activation config of ``kind``: its defaults, required fields from REQUIRED_FIELDS."""
    config_class = ACTIVATIONS[kind].config_class
    example_fields = {}
    for f in dataclasses.fields(config_class):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default:
            if f.name not in REQUIRED_FIELDS:
                pytest.fail(f"{kind}.{f.name} has no default: add an example to REQUIRED_FIELDS")
            example_fields[f.name] = REQUIRED_FIELDS[f.name]
    return {"kind": kind, **example_fields, **fields}


def example_member(kind: str, **fields):
    """A float64 member of ``kind`` with arch_helpers' traps set (s ≠ 1, b_dec ≠ 0, perturbed
    parameters); a penalty where the activation needs one."""
    needs = ACTIVATIONS[kind].needs_penalty
    penalty = {"kind": "l1", "coefficient": LAM} if needs else None
    return make_member(example(kind, **fields), penalty=penalty)


def has_two_paths(kind: str) -> bool:
    fields = {f.name for f in dataclasses.fields(ACTIVATIONS[kind].config_class)}
    return "kernel" in fields


TWO_PATH_KINDS = [kind for kind in KINDS if has_two_paths(kind)]
"""The kinds with a fast path beside the reference (a ``kernel`` field); the others have one."""


@pytest.mark.parametrize("kind", KINDS)
def test_save_folds_the_scale_and_load_round_trips(kind, tmp_path):
    sae = example_member(kind).sae
    _, x = data()
    s = float(sae.scale)
    assert s != 1.0 and sae.b_dec.abs().max() > 0.1
    loaded = round_trip(sae, x, tmp_path)  # same cfg, latents and reconstruction on raw x
    assert float(loaded.scale) == 1.0 and float(sae.scale) == s
    folded = sae.folded_copy().state_dict()
    assert sorted(loaded.state_dict()) == sorted(folded)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, folded[name], rtol=0, atol=0, msg=name)
    for name, tensor in sae.activation.state_dict().items():  # the fold leaves these alone
        torch.testing.assert_close(loaded.activation.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_3d_input_gives_what_the_flattened_input_gives(kind):
    sae = example_member(kind).sae
    _, x = data()
    flat = x.reshape(-1, D)
    sae.train()
    out3, out2 = sae(x), sae(flat)
    assert out3.x_hat.shape == x.shape
    torch.testing.assert_close(out3.x_hat.reshape(flat.shape), out2.x_hat)
    torch.testing.assert_close(as_dense(out3.latents), as_dense(out2.latents))
    sae.eval()
    with torch.no_grad():
        z3 = sae.encode(x)
        assert z3.shape == (*x.shape[:-1], sae.cfg.d_sae)
        torch.testing.assert_close(z3.reshape(-1, sae.cfg.d_sae), sae.encode(flat))


def test_some_activations_have_two_paths():
    assert {"topk", "batchtopk"} <= set(TWO_PATH_KINDS)


@pytest.mark.parametrize("kind", TWO_PATH_KINDS)
def test_fast_path_equals_reference_path(kind):
    fast = example_member(kind, kernel="torch")
    ref = example_member(kind, kernel="reference")
    ref.sae.load_state_dict(fast.sae.state_dict())
    _, x = data()
    dead = dead_mask("some")
    out_fast, total_fast, _ = saekit_loss(fast, x, dead)
    out_ref, total_ref, _ = saekit_loss(ref, x, dead)
    torch.testing.assert_close(as_dense(out_fast.latents), as_dense(out_ref.latents))
    torch.testing.assert_close(total_fast, total_ref, rtol=1e-10, atol=1e-12)
    for (name, p_fast), p_ref in zip(
        fast.sae.named_parameters(), ref.sae.parameters(), strict=True
    ):
        if p_fast.requires_grad:
            torch.testing.assert_close(p_fast.grad, p_ref.grad, msg=f"gradient of {name}")
    for member in (fast, ref):
        member.sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast.sae.encode(x), ref.sae.encode(x))


# ------------------------------------------------------------------------ the objective by hand


def _proof(act: str, penalty: str):
    """test_objective.py's hand total for one of its activations (plain reconstruction)."""

    def reference(P, scale, x, dead):
        parts, _ = objective_proof.hand_objective(act, "plain", penalty, "none", P, scale, x, dead)
        return parts

    return objective_proof.activation_cfg(act), objective_proof.penalty_cfg(penalty), reference


HAND = {
    "relu": _proof("relu", "l1"),
    "topk": _proof("topk", "none"),
    "batchtopk": _proof("batchtopk", "none"),
    "jumprelu": _proof("jumprelu", "l0"),
    "prolu": _proof("prolu", "l1"),
    "abstopk": (
        abstopk_proof.abstopk(),
        None,
        lambda P, scale, x, dead: abstopk_proof.reference_loss(P, scale, x, dead, "none")[0],
    ),
    "gated": (
        gated_proof.gated(),
        {"kind": "l1", "coefficient": gated_proof.LAM},
        lambda P, scale, x, dead: gated_proof.reference_loss(P, scale, x, "l1")[0],
    ),
    "hierarchical_topk": (
        htopk_proof.htopk(),
        None,
        lambda P, scale, x, dead: htopk_proof.reference_loss(P, scale, x, dead, "none"),
    ),
    "matching_pursuit": (
        mp_proof.mp(),
        None,
        lambda P, scale, x, dead: mp_proof.reference_loss(P, scale, x, dead, 0.0, "none")[0],
    ),
}
"""kind → (activation config, penalty config, float64 hand terms (P, scale, x, dead))."""


def test_every_activation_has_a_hand_objective():
    assert sorted(HAND) == KINDS, "write the float64 hand objective of the new activation"


@pytest.mark.parametrize("kind", KINDS)
def test_objective_equals_the_float64_hand_computation(kind):
    activation, penalty, reference = HAND[kind]
    member = make_member(activation, penalty=penalty)
    sae: SAE = member.sae
    assert float(sae.scale) != 1.0 and sae.b_dec.abs().max() > 0.1
    _, x = data()
    assert x.mean().abs() > 1.0  # data with a mean
    dead = dead_mask("none")
    _, total, parts = saekit_loss(member, x, dead)
    P = leaves(sae)
    ref_parts = reference(P, sae.scale.double(), x, dead)
    assert sorted(parts) == sorted(ref_parts)
    for name, value in ref_parts.items():
        torch.testing.assert_close(
            parts[name].detach(), value.detach(), rtol=1e-10, atol=1e-13, msg=f"term {name}"
        )
    ref_total = sum(ref_parts.values())
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-10, atol=0)
    ref_total.backward()
    assert_same_gradients(sae, P)
