"""Random saekit transcoders with every trap set (both scales ≠ 1, b_dec ≠ 0, d_out ≠ d_in where
the format allows), shared by the transcoder export tests."""

from __future__ import annotations

import math

import torch
from harness import D_IN, D_SAE

from saekit.model.config import SAEConfig
from saekit.model.sae import SAE

D_OUT = 12
IN_HOOK, OUT_HOOK = "model.layers.3.post_attention_layernorm", "model.layers.3.mlp"


def hooks(layer: int) -> tuple[str, str]:
    """A Llama block's MLP input (its norm's output) and output."""
    return IN_HOOK.replace(".3.", f".{layer}."), OUT_HOOK.replace(".3.", f".{layer}.")


@torch.no_grad()
def random_transcoder(
    activation: dict, skip: bool, d_out: int = D_OUT, seed: int = 1, layer: int = 3
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    hook, target_hook = hooks(layer)
    cfg = SAEConfig(
        D_IN,
        D_SAE,
        activation,
        hook=hook,
        model_name="meta-llama/Llama-3.2-1B",
        d_out=d_out,
        target_hook=target_hook,
        skip=skip,
    )
    tc = SAE(cfg)
    tc.W_enc.copy_(torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN))
    tc.W_dec.copy_(torch.randn(D_SAE, d_out, generator=g) * 0.3)
    tc.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
    tc.b_dec.copy_(0.5 * torch.randn(d_out, generator=g))
    if skip:
        tc.W_skip.copy_(torch.randn(d_out, D_IN, generator=g) / math.sqrt(D_IN))
    tc.scale.fill_(2.5)
    tc.target_scale.fill_(0.4)
    if activation["kind"] == "jumprelu":
        tc.activation.threshold.copy_(0.4 * torch.rand(D_SAE, generator=g) + 0.05)
    if activation["kind"] == "batchtopk":
        tc.activation.threshold.fill_(0.35)
        tc.activation.threshold_initialized.fill_(True)
    return tc.eval()
