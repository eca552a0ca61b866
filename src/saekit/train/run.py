"""A whole run: build the stream, train every SAE, evaluate on held-out data, save, summarise.

The run directory's layout is documented in :mod:`saekit.train.outputs`. Under torchrun each
worker runs :func:`saekit.train.run_distributed.run_distributed` instead.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from saekit.core.atomic import remove_stale_temporaries
from saekit.core.configs import to_dict
from saekit.core.paths import refuse_output_over_inputs
from saekit.train.checkpoint import (
    CHECKPOINT_DIR,
    NoCheckpoint,
    read_checkpoint_meta,
    verify_training_checkpoint,
)
from saekit.train.config import RunConfig, build_run_config, make_source
from saekit.train.config_files import load_config_file
from saekit.train.latent_parallel import run_latent
from saekit.train.launch import launched
from saekit.train.mesh import ParallelMesh
from saekit.train.outputs import evaluate_member, save_outputs, write_run_config
from saekit.train.preflight import check_fits
from saekit.train.reports import MemberReport
from saekit.train.resume_check import checked_resume_config
from saekit.train.run_distributed import run_distributed
from saekit.train.trainer import Trainer


def run_training(cfg: RunConfig, resume: bool = False) -> tuple[Trainer, list[MemberReport]]:
    if launched():  # a worker of a multi-process torchrun launch (reports on rank 0 only)
        return run_distributed(cfg, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_fits(cfg)
    if isinstance(cfg.parallel, ParallelMesh):  # one process of latent parallelism: T = 1
        return run_latent(cfg, None, resume, [wandb_logger(cfg)] if cfg.wandb_project else [])
    if not resume:
        write_run_config(cfg)
    source = make_source(cfg)
    trainer = Trainer(cfg, source)
    if resume and has_checkpoint(trainer.out_dir):
        trainer.load_checkpoint()
    else:
        trainer.trim_metrics()  # step 0: a killed earlier attempt's log starts over
    if resume:  # once the checkpoint loaded: a resume that fails leaves config.yaml as it was
        write_run_config(cfg)
    if cfg.wandb_project:
        trainer.log_callbacks.append(wandb_logger(cfg))
    trainer.fit()
    saes = {m.cfg.name: m.sae for m in trainer.members}
    for name, sae in saes.items():  # before the evaluation: a signal there loses no weights
        sae.save(trainer.out_dir / name)
    reports = [evaluate_member(m, source, cfg.eval_tokens, cfg.batch_size) for m in trainer.members]
    save_outputs(trainer.out_dir, saes, reports, saved=True)
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


def resume_config(run_dir: str | Path, steps: int | None = None, force: bool = False) -> RunConfig:
    """The config a checkpointed run was started with; ``steps`` may extend it (never below
    the checkpoint's step). Both halves of the checkpoint and the run's ``config.yaml`` are
    checked first (:mod:`saekit.train.resume_check`): nothing is written before they pass."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such run directory")
    remove_run_temporaries(run_dir)
    meta = verify_training_checkpoint(run_dir)
    if meta is None:
        if not (run_dir / "config.yaml").is_file():
            raise NoCheckpoint(f"--resume {run_dir}: no training checkpoint and no config.yaml")
        # Killed before its first checkpoint: nothing to resume, so start again from step 0.
        print(
            f"saekit: {run_dir} has no checkpoint yet (the run stopped before its first one); "
            "starting it again from step 0 with its config.yaml",
            file=sys.stderr,
        )
        data = load_config_file(run_dir / "config.yaml")
        meta = {"config": data, "step": 0}
    else:
        data, note = checked_resume_config(run_dir, meta["config"], force)
        if note:
            print(f"saekit: warning: {note}", file=sys.stderr)
    before = meta["config"].get("steps")
    where = "--steps" if steps is not None else "steps in config.yaml"
    steps = data.get("steps") if steps is None else steps
    if steps != before:
        if not isinstance(steps, int) or steps < int(meta["step"]):
            raise ValueError(
                f"{where} {steps} is below the checkpoint's step {meta['step']} in {run_dir}"
            )
        print(
            f"saekit: resuming with steps = {steps} instead of {before} (the "
            "learning-rate schedule follows the new length)",
            file=sys.stderr,
        )
    data = {**data, "steps": steps, "out_dir": str(run_dir)}
    return build_run_config(data)


def has_checkpoint(run_dir: Path) -> bool:
    try:
        read_checkpoint_meta(run_dir)
    except NoCheckpoint:
        return False
    return True


RUN_FILES = ("config.yaml", "summary.json", CHECKPOINT_DIR)


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds (part of) a saekit run."""
    out_dir = Path(out_dir)
    if any((out_dir / f).exists() for f in RUN_FILES):
        return True
    return out_dir.is_dir() and any(
        (d / "metrics.jsonl").exists() or (d / "cfg.json").exists()
        for d in out_dir.iterdir()
        if d.is_dir()
    )


def discard_failed_start(cfg: RunConfig, created: bool) -> None:
    """After a new run failed before its first checkpoint (NaN loss, a wrong width, out of
    memory): remove what it wrote (config.yaml, its SAEs' logs; the directory if it created
    it), so the corrected command is not refused as "already holds a run". Nothing is removed
    once a checkpoint or a saved SAE exists: that is work to keep (resume, or --force)."""
    out = Path(cfg.out_dir)
    names = [s.name for s in cfg.saes]
    if (out / CHECKPOINT_DIR).exists() or any((out / n / "cfg.json").exists() for n in names):
        return
    for name in names:
        if (out / name).is_dir() and {p.name for p in (out / name).iterdir()} <= {"metrics.jsonl"}:
            shutil.rmtree(out / name)
    (out / "config.yaml").unlink(missing_ok=True)
    remove_run_temporaries(out)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def prepare_out_dir(cfg: RunConfig, force: bool = False) -> None:
    """Before a new run writes anything: refuse an ``out_dir`` holding another run unless
    ``force``, which removes that run's files (config, summary, checkpoint, SAE directories)."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    refuse_output_over_inputs(out, cfg.data.input_paths(), flag="out_dir")
    if not holds_run(out):
        remove_run_temporaries(out)
        return
    if not force:
        raise ValueError(
            f"out_dir {out} already holds a run; continue it with --resume {out}, replace it "
            "with --force, or choose another --out"
        )
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for d in out.iterdir():
        if d.is_dir() and ((d / "metrics.jsonl").exists() or (d / "cfg.json").exists()):
            shutil.rmtree(d)
    remove_run_temporaries(out)


def remove_run_temporaries(run_dir: Path) -> None:
    """Remove what a killed process left in a run directory (``.NAME.tmp-PID`` files and
    directories, ``.NAME.old-PID`` after restoring it): the run's own files and each SAE's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    remove_stale_temporaries(run_dir)
    for d in run_dir.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            remove_stale_temporaries(d)
