"""What tools need to know about an exported SAE, gathered from its saekit directory.

From the SAE's cfg.json: model, hook, training data and the training architecture (its
activation config); from ``eval.json`` beside it: the final L0 and dead-latent count; from the
run's ``config.yaml`` one level up: the context size of a run on a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from saekit.core.configs import to_dict
from saekit.interop.names import transformer_lens_name
from saekit.interop.portable import InteropError
from saekit.model.clt import CrossLayerTranscoder
from saekit.model.sae import SAE


def dataset_name(training_data: Any) -> str | None:
    """The dataset (hub id, path or text file) in an SAE's ``metadata.training_data``."""
    if not isinstance(training_data, dict) or not isinstance(training_data.get("text"), dict):
        return None
    text = training_data["text"]
    return text.get("dataset") or text.get("text_file")


def export_info(sae: SAE, sae_dir: Path | None) -> dict[str, Any]:
    """model_name, hook (saekit's and TransformerLens'), dataset, context_size, final l0 and
    dead_latents, training_architecture; a field is None where the SAE does not record it."""
    cfg = sae.cfg
    info: dict[str, Any] = {
        "model_name": cfg.model_name,
        "hook": cfg.hook,
        "hook_transformer_lens": transformer_lens_name(cfg.hook),
        "dataset": dataset_name(cfg.metadata.get("training_data")),
        "context_size": None,
        "l0": None,
        "dead_latents": None,
        "training_architecture": to_dict(cfg.activation),
    }
    if cfg.transcoder:
        info["target_hook"] = cfg.target_hook
        info["target_hook_transformer_lens"] = transformer_lens_name(cfg.target_hook)
    if sae_dir is None:
        return info
    eval_path = sae_dir / "eval.json"
    if eval_path.is_file():
        report = _read(eval_path, json.loads)
        info["l0"] = report.get("l0")
        if report.get("dead_fraction") is not None:
            info["dead_latents"] = round(report["dead_fraction"] * cfg.d_sae)
    run_config = sae_dir.parent / "config.yaml"
    if run_config.is_file():
        from saekit.data.sources.registry import source_config

        data = _read(run_config, yaml.safe_load).get("data") or {}
        # the contexts the activations came from: a model run's, or those the cache recorded
        info["context_size"] = source_config(data, validate=False).context_size()
    return info


def _read(path: Path, parse: Any) -> dict[str, Any]:
    """A JSON or YAML mapping, or a one-line InteropError naming the file."""
    try:
        data = parse(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:  # JSON, YAML, UTF-8 errors
        raise InteropError(f"{path}: unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a mapping")
    return data


def clt_export_info(clt: CrossLayerTranscoder) -> dict[str, Any]:
    """A cross-layer transcoder's model_name, hooks and target_hooks (one per layer, or None),
    dataset and training_architecture (its activation config)."""
    cfg = clt.cfg
    return {
        "model_name": cfg.model_name,
        "hooks": cfg.hooks,
        "target_hooks": cfg.target_hooks,
        "dataset": dataset_name(cfg.metadata.get("training_data")),
        "training_architecture": to_dict(cfg.activation),
    }
