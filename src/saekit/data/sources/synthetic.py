"""``data.source: synthetic``: the built-in generator of known sparse features
(:mod:`saekit.data.synthetic.generator`), settings under ``data.synthetic``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor

from saekit.data.sources.config import GeneratedSourceConfig
from saekit.data.sources.interface import ActivationSource, StreamSettings
from saekit.data.synthetic.generator import SyntheticConfig, SyntheticData


class SyntheticSource(ActivationSource):
    """Batches of a generator: batch i is a pure function of (seed, i)."""

    INIT_INDEX = 10**9  # batches for initialisation and evaluation never overlap training ones
    EVAL_INDEX = 2 * 10**9

    def __init__(self, data, batch_size: int, init_tokens: int = 16_384):
        self.data = data
        self.batch_size = batch_size
        self.init_tokens = init_tokens

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        return self.data.stream(self.batch_size, start=start)

    def sample_for_init(self) -> Tensor:
        return self.data.batch(self.INIT_INDEX, self.init_tokens).x

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for i in range(math.ceil(n_tokens / batch_size)):
            batch = self.data.batch(self.EVAL_INDEX + i, min(batch_size, n_tokens - i * batch_size))
            yield batch.x, batch.coefficients

    def known_features(self) -> SyntheticData:
        return self.data


@dataclass
class SyntheticSourceConfig(GeneratedSourceConfig):
    """Built-in ground truth: known features in superposition."""

    kind = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the synthetic generator."""

    def describe(self) -> str:
        return "the synthetic data (data.synthetic.d)"

    def input_width(self) -> int:
        return self.synthetic.d

    def target_width(self) -> int | None:
        return self.synthetic.d_out

    def has_target(self) -> bool:
        return self.synthetic.d_out is not None

    def ground_truth(self) -> SyntheticData:
        return SyntheticData(self.synthetic)

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> SyntheticSource:
        # every rank the same stream: data parallel shards it by batch index (ShardedSource)
        return SyntheticSource(SyntheticData(self.synthetic, run.seed), run.batch_size)
