"""A whole run: build the stream, train every SAE, evaluate on held-out data, save, summarise.

The run directory's layout is documented in :mod:`saekit.train.outputs`. Under torchrun each
worker runs :func:`saekit.train.run_distributed.run_distributed` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saekit.data.from_config import make_source
from saekit.train.checkpoint import read_checkpoint_meta
from saekit.train.config import RunConfig, build_run_config, to_dict
from saekit.train.launch import launched
from saekit.train.outputs import evaluate_member, save_outputs, write_run_config
from saekit.train.run_distributed import run_distributed
from saekit.train.trainer import Trainer


def run_training(cfg: RunConfig, resume: bool = False) -> tuple[Trainer, list[dict[str, Any]]]:
    if launched():  # a worker of a multi-process torchrun launch (reports on rank 0 only)
        return run_distributed(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_run_config(cfg)
    source = make_source(cfg)
    trainer = Trainer(cfg, source)
    if resume:
        trainer.load_checkpoint()
    if cfg.wandb_project:
        trainer.log_callbacks.append(wandb_logger(cfg))
    trainer.fit()
    reports = [evaluate_member(m, source, cfg.eval_tokens, cfg.batch_size) for m in trainer.members]
    save_outputs(trainer.out_dir, {m.cfg.name: m.sae for m in trainer.members}, reports)
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
