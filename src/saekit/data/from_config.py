"""The batch source a run's config describes: the built-in generator, a model or a cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

from saekit.data.lm_source import make_lm_source
from saekit.data.source import ActivationSource, SyntheticSource
from saekit.data.synthetic import SyntheticData

if TYPE_CHECKING:
    from saekit.train.config import RunConfig


def make_source(cfg: RunConfig) -> ActivationSource:
    """One process's source (multi-process runs: :mod:`saekit.train.run_distributed`)."""
    if cfg.data.source == "synthetic":
        return SyntheticSource(SyntheticData(cfg.data.synthetic, cfg.seed), cfg.batch_size)
    return make_lm_source(cfg)
