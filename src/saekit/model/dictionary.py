"""Every dictionary architecture behind one door: build one from its config, load one from its
directory, whatever it is (an SAE or transcoder, a cross-layer transcoder, a crosscoder).

The configs (saekit.model.config.DictionaryConfig and its variants) register by ``kind`` when
their module is imported; importing this module imports them all, so parsing a run config's
``sae:`` (``kind: clt``, ``kind: crosscoder``, none for an SAE) knows every kind. Training
builds its dictionary here (saekit.train.member); evaluation, reports and exports load one here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from saekit.core.atomic import recover_directory
from saekit.model.clt import CLTConfig, CrossLayerTranscoder
from saekit.model.config import DictionaryConfig, SAEConfig
from saekit.model.crosscoder import Crosscoder, CrosscoderConfig
from saekit.model.format import CheckpointError, read_config
from saekit.model.sae import SAE

Dictionary = SAE | CrossLayerTranscoder | Crosscoder
"""Any dictionary: each has split_stream, forward -> ForwardOutput, init_from_data,
encoder_view, remove_parallel_grad_, normalize_decoder_, save and load."""

CLASSES: dict[type, type] = {
    SAEConfig: SAE,
    CLTConfig: CrossLayerTranscoder,
    CrosscoderConfig: Crosscoder,
}
"""config class → dictionary class."""


def build_dictionary(cfg: DictionaryConfig, device: torch.device | str | None = None) -> Dictionary:
    """The dictionary ``cfg`` describes (freshly initialised)."""
    return CLASSES[type(cfg)](cfg, device=device)


def load_dictionary(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> Dictionary:
    """Load whatever dictionary the directory ``path`` holds (its cfg.json's ``kind``), in eval
    mode; one-line CheckpointError for a missing, corrupt or mismatched one."""
    path = Path(path)
    recover_directory(path)
    data = read_config(path, verify)
    try:
        cfg = DictionaryConfig.from_plain(data, "config")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad config in cfg.json: {exc}") from exc
    return CLASSES[type(cfg)].load(path, device=device, verify=verify)
