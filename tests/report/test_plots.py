"""The run's plots (saekit.report.plots) of a sweep whose dictionaries are not SAEs: `saekit
train` of two CLTs or two crosscoders plots them after training (it once loaded each as an SAE
and failed after the run had finished)."""

from __future__ import annotations

import pytest
import torch

from saekit.report.plots import sweep_plots
from saekit.train.config import build_run_config
from saekit.train.run import run_training


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
def test_sweep_plots_of_two_multi_hook_dictionaries(tmp_path, kind):
    torch.set_num_threads(1)
    if kind == "clt":
        hooks = [f"layers.{i}.mlp" for i in range(2)]
        world = {"kind": "clt", "n_layers": 2, "d": 6, "n_features": 12}
        data = {"input_hooks": [f"{h}:input" for h in hooks], "target_hooks": hooks}
    else:
        world = {"kind": "crosscoder", "n_sources": 2, "d": 6, "n_features": 12}
        data = {"input_hooks": ["a", "b"]}
    saes = [
        {"name": f"k{k}", "sae": {"kind": kind, "d_sae": 8, "activation": {"kind": "topk", "k": k}}}
        for k in (1, 2)
    ]
    cfg = build_run_config(
        {
            "data": {"source": "multihook", "multihook": world, **data},
            "saes": saes,
            "batch_size": 32,
            "steps": 2,
            "eval_tokens": 64,
            "out_dir": str(tmp_path / "run"),
            "progress": False,
        }
    )
    run_training(cfg)
    paths = sweep_plots(tmp_path / "run")
    names = sorted(p.name for p in paths)
    # no cos heatmap: a CLT's or crosscoder's truth is not one dictionary of directions
    assert names == ["encoder_bias.png", "l0_histogram.png", "l0_vs_fvu.png"]
    assert all(p.stat().st_size > 0 for p in paths)
