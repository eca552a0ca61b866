"""A whole run: build the stream, train every SAE, evaluate on held-out data, save, summarise.

Run directory layout::

    <out_dir>/config.yaml            the full resolved config
    <out_dir>/checkpoint/            resumable training state
    <out_dir>/<sae name>/sae.safetensors, cfg.json   the trained SAE (scale folded)
    <out_dir>/<sae name>/metrics.jsonl               training log
    <out_dir>/<sae name>/eval.json                   final evaluation
    <out_dir>/summary.json                           one row per SAE
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from saekit.activations import as_dense
from saekit.data.synthetic import SyntheticData
from saekit.eval import ground_truth
from saekit.eval.calibrate import calibrate_batchtopk, l0_target, off_target, threshold_set
from saekit.eval.metrics import MetricAccumulator
from saekit.sae import atomic_write_text
from saekit.train.checkpoint import read_checkpoint_meta
from saekit.train.config import RunConfig, build_run_config, to_dict
from saekit.train.distributed import launched, run_distributed
from saekit.train.trainer import ActivationSource, Member, SyntheticSource, Trainer


def make_source(cfg: RunConfig) -> ActivationSource:
    if cfg.data.source == "synthetic":
        return SyntheticSource(SyntheticData(cfg.data.synthetic), cfg.batch_size)
    from saekit.data.lm_source import make_lm_source

    return make_lm_source(cfg)


@torch.no_grad()
def evaluate_member(
    member: Member, source: ActivationSource, n_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Held-out metrics (ratio of sums over the whole set) and, on synthetic data, recovery.

    A BatchTopK SAE is evaluated with its inference threshold calibrated on the held-out
    batches (saekit.eval.calibrate; reported as ``threshold``, which :func:`save_outputs` saves,
    beside the EMA θ and the L0 it gave); any SAE whose inference L0 is more than 10% off its
    target gets a warning.
    """
    sae = member.sae.eval()
    calibration = None
    if sae.cfg.activation == "batchtopk":
        held_out = (x for x, _ in source.eval_batches(n_tokens, batch_size))
        calibration = calibrate_batchtopk(sae, held_out, n_tokens, apply=False)
    with threshold_set(sae, None if calibration is None else calibration.threshold):
        report = _evaluate(member, source, n_tokens, batch_size)
    if calibration is not None:
        report.update(
            threshold=calibration.threshold,
            threshold_ema=calibration.threshold_ema,
            l0_ema=calibration.l0_ema,
        )
    stats = getattr(source, "harvest_stats", None)  # a model run online
    if stats is not None and source.data.outlier_norm is not None:
        report.update(stats.summary())
    target = l0_target(sae.cfg, member.cfg.target_l0)
    if target is not None:
        report["l0_target"] = target
        message = off_target(member.cfg.name, report["l0"], target)
        if message is not None:
            warnings.warn(message, stacklevel=2)
    return report


def _evaluate(
    member: Member, source: ActivationSource, n_tokens: int, batch_size: int
) -> dict[str, Any]:
    sae = member.sae
    device = next(sae.parameters()).device
    acc = MetricAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device=device)
    synthetic = source.data if isinstance(source, SyntheticSource) else None
    absorbed = pairs = 0
    hierarchical = synthetic is not None and synthetic.cfg.kind == "hierarchical"
    for x, coefficients in source.eval_batches(n_tokens, batch_size):
        x = x.to(device)
        out = sae(x)
        acc.add(x, out.x_hat, out.latents)
        if hierarchical:
            a, t = ground_truth.absorption_counts(
                synthetic.directions,
                synthetic.parent_of,
                coefficients,
                as_dense(out.latents),
                sae.W_dec,
            )
            absorbed, pairs = absorbed + a, pairs + t
    result = acc.result()
    report: dict[str, Any] = {"name": member.cfg.name, **result.summary()}
    if synthetic is not None:
        rec = ground_truth.recovery(synthetic.directions, sae.W_dec)
        report.update(
            true_l0=synthetic.true_l0,
            mean_max_cos=rec.mean_max_cos,
            recovered_share=rec.recovered_share,
            mcc=rec.mcc,
        )
        if hierarchical:
            report["absorption"] = absorbed / pairs if pairs else float("nan")
    report["l0_histogram"] = result.l0_histogram
    return report


def save_outputs(trainer: Trainer, reports: list[dict[str, Any]]) -> None:
    out = trainer.out_dir
    for member, report in zip(trainer.members, reports, strict=True):
        calibrated = report["threshold"] if "threshold_ema" in report else None
        with threshold_set(member.sae, calibrated):
            member.sae.save(out / member.cfg.name)  # BatchTopK: with the calibrated θ
        atomic_write_text(out / member.cfg.name / "eval.json", json.dumps(report, indent=2))
    summary = [{k: v for k, v in r.items() if k != "l0_histogram"} for r in reports]
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))


def run_training(cfg: RunConfig, resume: bool = False) -> tuple[Trainer, list[dict[str, Any]]]:
    if launched():  # a worker of a multi-process torchrun launch (reports on rank 0 only)
        return run_distributed(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    source = make_source(cfg)
    trainer = Trainer(cfg, source)
    if resume:
        trainer.load_checkpoint()
    if cfg.wandb_project:
        trainer.log_callbacks.append(wandb_logger(cfg))
    trainer.fit()
    reports = [evaluate_member(m, source, cfg.eval_tokens, cfg.batch_size) for m in trainer.members]
    save_outputs(trainer, reports)
    return trainer, reports


def wandb_logger(cfg: RunConfig):
    """A log callback sending each SAE's metrics to Weights & Biases (one run per saekit run)."""
    try:
        import wandb
    except ImportError as exc:
        raise ValueError(
            "wandb_project is set but wandb is not installed: pip install wandb"
        ) from exc
    run = wandb.init(
        project=cfg.wandb_project, name=Path(cfg.out_dir).name, config=to_dict(cfg), dir=cfg.out_dir
    )

    def log(member, record) -> None:
        values = {f"{member.cfg.name}/{k}": v for k, v in record.values.items()}
        run.log({"tokens": record.tokens, **values}, step=record.step)

    return log


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config a checkpointed run was started with (``steps`` may be extended)."""
    meta = read_checkpoint_meta(Path(run_dir))
    data = meta["config"]
    data.update(overrides or {})
    data["out_dir"] = str(run_dir)
    return build_run_config(data)


COLUMNS = [
    ("name", "SAE", "{}"),
    ("l0", "L0", "{:.2f}"),
    ("l0_ema", "L0 at EMA θ", "{:.2f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("dead_fraction", "dead", "{:.1%}"),
    ("mean_max_cos", "mean max|cos|", "{:.3f}"),
    ("recovered_share", "recovered>0.9", "{:.1%}"),
    ("mcc", "MCC", "{:.3f}"),
    ("absorption", "absorption", "{:.1%}"),
]


def format_table(reports: list[dict[str, Any]]) -> str:
    """A markdown table of the reports (columns present in any report)."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in reports)]
    rows = [[c[1] for c in cols], ["---"] * len(cols)]
    for r in reports:
        rows.append([c[2].format(r[c[0]]) if c[0] in r else "" for c in cols])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
