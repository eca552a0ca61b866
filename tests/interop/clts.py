"""Random saekit cross-layer transcoders with every trap set (per-layer scales ≠ 1 and input ≠
target scale, nonzero biases, thresholds), their 3-D input, and circuit-tracer's layout of it;
Gemma Scope 2 CLT folders; shared by the CLT exchange tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from harness import D_IN, make_input
from safetensors.torch import save_file

from saekit.model.clt import CLTConfig, CrossLayerTranscoder

L, M = 3, 24
S_X = (2.5, 0.6, 1.7)
S_Y = (0.4, 1.3, 2.2)


def hooks(n_layers: int = L, first: int = 0) -> tuple[list[str], list[str]]:
    """Each Llama block's MLP input (its norm's output) and output."""
    blocks = range(first, first + n_layers)
    return (
        [f"model.layers.{n}.post_attention_layernorm" for n in blocks],
        [f"model.layers.{n}.mlp" for n in blocks],
    )


@torch.no_grad()
def random_clt(
    activation: dict, seed: int = 1, d_out: int = D_IN, first_layer: int = 0
) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    inputs, targets = hooks(L, first_layer)
    cfg = CLTConfig(
        d_in=D_IN,
        d_sae=M,
        n_layers=L,
        activation=activation,
        d_out=d_out,
        hooks=inputs,
        target_hooks=targets,
        model_name="meta-llama/Llama-3.2-1B",
    )
    clt = CrossLayerTranscoder(cfg)
    clt.W_enc.copy_(torch.randn(L, M, D_IN, generator=g) / math.sqrt(D_IN))
    clt.b_enc.copy_(0.3 * torch.randn(L, M, generator=g))
    for W in clt.W_dec:
        W.copy_(0.3 * torch.randn(W.shape, generator=g))
    clt.b_dec.copy_(0.5 * torch.randn(L, d_out, generator=g))
    clt.scale.copy_(torch.tensor(S_X))
    clt.target_scale.copy_(torch.tensor(S_Y))
    if activation["kind"] == "jumprelu":
        clt.activation.threshold.copy_(0.4 * torch.rand(L * M, generator=g) + 0.05)
    if activation["kind"] == "batchtopk":
        clt.activation.threshold.fill_(0.35)
        clt.activation.threshold_initialized.fill_(True)
    return clt.eval()


def clt_input(seed: int = 0) -> torch.Tensor:
    """[2, 7, L·d_in]: every layer's input 3-D with a nonzero mean, layer-major columns."""
    return torch.cat([make_input(seed + n) for n in range(L)], dim=-1)


def per_layer(x: torch.Tensor, width: int) -> torch.Tensor:
    """saekit's [..., L·width] as circuit-tracer's [L, n_pos, width] (positions flattened)."""
    return x.reshape(-1, L, width).transpose(0, 1).contiguous()


def from_per_layer(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """circuit-tracer's [L, n_pos, width] back to saekit's [*lead, L·width]."""
    return t.transpose(0, 1).reshape(*lead, -1)


def gemma_scope_2_clt(
    folder: Path, seed: int = 5, skip: bool = False, theta_low: float = -0.1
) -> dict[str, torch.Tensor]:
    """A Gemma Scope 2 CLT folder in float64 (params_layer_l.safetensors, config.json): w_dec
    nonzero into earlier layers too (not part of the CLT), θ from ``theta_low`` (some θ < 0 by
    default). Returns the tensors stacked over layers."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    t = {
        "w_enc": torch.randn(L, D_IN, M, generator=g, dtype=torch.float64) * 0.3,
        "b_enc": torch.randn(L, M, generator=g, dtype=torch.float64) * 0.3,
        "w_dec": torch.randn(L, M, L, D_IN, generator=g, dtype=torch.float64) * 0.3,
        "b_dec": torch.randn(L, D_IN, generator=g, dtype=torch.float64),
        "threshold": torch.rand(L, M, generator=g, dtype=torch.float64) * 0.6 + theta_low,
    }
    if skip:
        t["affine_skip_connection"] = torch.randn(L, D_IN, D_IN, generator=g, dtype=torch.float64)
    for layer in range(L):
        save_file(
            {k: v[layer].contiguous() for k, v in t.items()},
            str(folder / f"params_layer_{layer}.safetensors"),
        )
    points = {"hf_hook_point_in": "model.layers.0.pre_feedforward_layernorm.output"}
    points["hf_hook_point_out"] = "model.layers.0.post_feedforward_layernorm.output"
    (folder / "config.json").write_text(json.dumps({"model_name": "gemma-3-1b-pt", **points}))
    return t
