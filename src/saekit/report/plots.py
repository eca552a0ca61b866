"""PNG plots of a run: L0 against FVU, the L0-per-token histogram, decoder-versus-truth |cos|
heatmaps and encoder-bias histograms (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saekit.data.sources.registry import source_config  # noqa: E402
from saekit.data.synthetic.generator import SyntheticData  # noqa: E402
from saekit.eval.ground_truth import cosine_matrix  # noqa: E402
from saekit.model.dictionary import load_dictionary  # noqa: E402
from saekit.model.sae import SAE  # noqa: E402


def _reports(run_dir: Path) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return [json.loads((run_dir / r["name"] / "eval.json").read_text()) for r in summary]


def plot_l0_fvu(reports: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in reports:
        ax.scatter(r["l0"], r["fvu"], s=40)
        ax.annotate(
            r["name"], (r["l0"], r["fvu"]), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU")
    ax.set_title("Sparsity vs reconstruction (held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_l0_histograms(reports: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        hist = torch.tensor(r["l0_histogram"], dtype=torch.float64)
        ax.step(range(len(hist)), hist / hist.sum(), where="mid", label=r["name"])
    ax.set_xlabel("active latents on a token")
    ax.set_ylabel("share of tokens")
    ax.set_title("L0 per token (adaptive sparsity)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cos_heatmaps(run_dir: Path, names: list[str], truth: SyntheticData, path: Path) -> Path:
    """Per SAE: |cos| of the 64 most frequent true features with their best decoder rows."""
    n_show = min(64, truth.cfg.n_features)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        sae = SAE.load(run_dir / name)
        cos = cosine_matrix(truth.directions[:n_show], sae.W_dec).abs()
        best = cos.argmax(dim=1)
        ax.imshow(cos[:, best].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("best latent of feature j")
        ax.set_ylabel("true feature")
    fig.suptitle("|cos| decoder vs truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bias_histograms(run_dir: Path, names: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        sae = load_dictionary(run_dir / name)  # any kind: a sweep of CLTs or crosscoders too
        bias = sae.activation.plot_bias(sae.encoder_view())  # b_enc, or ProLU's own b
        ax.hist(bias.detach().numpy(), bins=60, histtype="step", label=name)
    ax.set_xlabel("encoder bias")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plots(run_dir: Path) -> list[Path]:
    """All plots of a finished run, written next to its summary."""
    import yaml

    reports = _reports(run_dir)
    names = [r["name"] for r in reports]
    paths = [
        plot_l0_fvu(reports, run_dir / "l0_vs_fvu.png"),
        plot_l0_histograms(reports, run_dir / "l0_histogram.png"),
        plot_bias_histograms(run_dir, names, run_dir / "encoder_bias.png"),
    ]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    truth = source_config(cfg["data"], validate=False).ground_truth()
    if truth is not None:  # a generated source's known features
        paths.append(plot_cos_heatmaps(run_dir, names, truth, run_dir / "cos_heatmap.png"))
    return paths
