"""``data.source: synthbench``: a SynthSAEBench world (arXiv 2602.14687;
:mod:`saekit.data.synthetic.synthbench_world`) as a training source, settings under
``data.synthbench`` (defaults: SynthSAEBench-16k).

This module and its line in :mod:`saekit.data.sources.registry` are all it took to add it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor

from saekit.data.sources.config import GeneratedSourceConfig
from saekit.data.sources.interface import StreamSettings
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.saelens_world import load_saelens_world
from saekit.data.synthetic.synthbench_sampler import SynthBenchData
from saekit.data.synthetic.synthbench_world import SynthBenchConfig


class SynthBenchSource(SyntheticSource):
    """A SynthSAEBench world's batches, with the built-in source's init and held-out indices;
    held-out coefficients come from the sparse firings."""

    def eval_batches(
        self, n_tokens: int, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        for i in range(math.ceil(n_tokens / batch_size)):
            b = self.data.batch(self.EVAL_INDEX + i, min(batch_size, n_tokens - i * batch_size))
            yield b.x, b.firings.dense(self.data.cfg.n_features)

    def known_features(self) -> None:
        """None: a world is scored by its own metrics (saekit.synthbench.metrics), not the
        built-in generator's recovery columns."""
        return None


@dataclass
class SynthBenchSourceConfig(GeneratedSourceConfig):
    """A SynthSAEBench world: hierarchical, correlated features of Zipf frequencies."""

    kind = "synthbench"
    synthbench: SynthBenchConfig = field(default_factory=SynthBenchConfig)
    """Settings of the world (the stream's draws follow the run's seed); ``world_path`` reads
    a world SAELens saved instead of generating one."""

    def describe(self) -> str:
        if self.synthbench.world_path:
            return f"the SynthSAEBench world saved at {self.synthbench.world_path}"
        return "the SynthSAEBench world (data.synthbench.d)"

    def input_width(self) -> int:
        if self.synthbench.world_path:  # the file's width, not the preset's
            return load_saelens_world(self.synthbench).cfg.d
        return self.synthbench.d

    def ground_truth(self) -> SynthBenchData:
        return SynthBenchData(self.synthbench)

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> SynthBenchSource:
        # every rank the same stream: data parallel shards it by batch index (ShardedSource)
        return SynthBenchSource(SynthBenchData(self.synthbench, run.seed), run.batch_size)
