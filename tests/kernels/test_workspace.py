"""The fast path's reused [N, M] buffer (saekit/kernels/workspace.py): reused when nothing holds
the last one, never while a caller still holds it, and the numbers are those of a fresh one."""

from __future__ import annotations

import torch

from saekit.core.encoding import encoder_preacts
from saekit.kernels import workspace
from saekit.model.config import SAEConfig
from saekit.model.sae import SAE


def make_sae(kind="topk"):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, activation={"kind": kind, "k": 3}))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    return sae


def pre_of(out):
    return out.encoding.preacts.detached


def test_the_buffer_is_reused_once_the_last_output_is_gone():
    sae, x = make_sae(), torch.randn(9, 12)
    out = sae(x)
    ptr = pre_of(out).data_ptr()
    out.x_hat.sum().backward()
    del out
    out = sae(x + 1.0)
    assert pre_of(out).data_ptr() == ptr  # the same buffer, overwritten
    expected = encoder_preacts(x + 1.0, sae.W_enc, sae.b_enc, sae.input_center)
    torch.testing.assert_close(pre_of(out), expected, rtol=0, atol=0)


def test_held_pre_activations_are_never_overwritten():
    sae, x = make_sae(), torch.randn(9, 12)
    pre = pre_of(sae(x))  # the very tensor the fast path computed into
    kept = pre.clone()
    second = sae(x * 3.0)
    assert pre_of(second).data_ptr() != pre.data_ptr()
    torch.testing.assert_close(pre, kept, rtol=0, atol=0)


def test_a_held_output_is_never_overwritten():
    sae, x = make_sae(), torch.randn(9, 12)
    first = sae(x)
    kept = pre_of(first).clone()
    view = pre_of(first)[2:]  # even a view of it alone keeps the buffer held
    del first
    second = sae(x * 3.0)
    assert pre_of(second).data_ptr() != view.data_ptr() - 2 * 40 * 4  # view starts at row 2
    torch.testing.assert_close(view, kept[2:], rtol=0, atol=0)
    expected = encoder_preacts(x * 3.0, sae.W_enc, sae.b_enc, sae.input_center)
    torch.testing.assert_close(pre_of(second), expected, rtol=0, atol=0)


def test_no_buffer_under_autocast_or_for_another_shape():
    sae = make_sae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert workspace.free_buffer(sae, 9, 40, torch.float32) is None
    ptr = workspace.free_buffer(sae, 9, 40, torch.float32).data_ptr()
    held = workspace.free_buffer(sae, 9, 40, torch.float32)  # nothing held the first one
    assert held.data_ptr() == ptr
    other = workspace.free_buffer(sae, 9, 40, torch.float32)  # `held` still holds it
    assert other.data_ptr() != held.data_ptr()
    assert workspace.free_buffer(sae, 10, 40, torch.float32).shape == (10, 40)
    assert workspace.free_buffer(sae, 10, 40, torch.float64).dtype == torch.float64


def test_inference_mode_then_training_forward():
    sae, x = make_sae(), torch.randn(9, 12)
    with torch.inference_mode():
        del_me = sae(x)
    del del_me
    out = sae(x)  # no "inplace update to inference tensor" error
    expected = encoder_preacts(x, sae.W_enc, sae.b_enc, sae.input_center)
    torch.testing.assert_close(pre_of(out), expected, rtol=0, atol=0)


def test_a_held_storage_object_blocks_reuse():
    sae, x = make_sae(), torch.randn(9, 12)
    pre = pre_of(sae(x))
    storage, ptr = pre.untyped_storage(), pre.data_ptr()  # noqa: F841 (held on purpose)
    del pre
    assert pre_of(sae(x * 2.0)).data_ptr() != ptr


def test_shared_memory_blocks_reuse():
    """torch.multiprocessing moves a tensor it sends to shared memory; the receiver holds it
    without the sender's counts knowing."""
    sae, x = make_sae(), torch.randn(9, 12)
    pre = pre_of(sae(x))
    pre.share_memory_()
    ptr = pre.data_ptr()
    del pre
    assert pre_of(sae(x * 3.0)).data_ptr() != ptr
