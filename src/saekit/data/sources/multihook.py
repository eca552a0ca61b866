"""``data.source: multihook``: a synthetic stream of several hooks with a known map between
them (:mod:`saekit.data.synthetic.multihook`: cross-layer transcoder and crosscoder ground
truth), settings under ``data.multihook``.

Like a cache of several hooks, a run chooses what it trains on with ``data.hook`` (an SAE) or
``data.hook`` + ``data.target_hook`` (a transcoder, e.g. one layer's per-layer transcoder);
with neither, a world of 2 hooks gives the transcoder from the first to the second and one of
3 or more is refused (saekit.data.hook_columns.selected_hooks). The run's evaluation then
scores recovery against the vectors the true features write into the chosen hook (the
target's, for a transcoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saekit.data.hook_columns import selected_hooks
from saekit.data.sources.config import GeneratedSourceConfig
from saekit.data.sources.interface import StreamSettings
from saekit.data.sources.synthetic import SyntheticSource
from saekit.data.synthetic.multihook import (
    CLTWorldConfig,
    HookSelection,
    MultiHookConfig,
    MultiHookData,
)


@dataclass
class MultiHookSourceConfig(GeneratedSourceConfig):
    """Built-in ground truth over several hooks: a cross-layer map or shared and exclusive
    features."""

    kind = "multihook"
    multihook: MultiHookConfig = field(default_factory=CLTWorldConfig)
    """The world: ``{kind: clt, ...}`` or ``{kind: crosscoder, ...}`` (its module documents
    the fields)."""
    hook: str | None = None
    """Train on this hook of the world (needed when it has 3 or more hooks)."""
    target_hook: str | None = None
    """With ``hook``: train a transcoder from ``hook`` to this one."""

    def validate(self) -> None:
        self._hooks()

    def _hooks(self) -> list[str]:
        """The hooks the run trains on: [input] or [input, target]."""
        names = [name for name, _ in self.multihook.hooks()]
        return selected_hooks(names, self.hook, self.target_hook, self.describe())

    def describe(self) -> str:
        return f"the synthetic {self.multihook.kind} world (data.multihook)"

    def input_width(self) -> int:
        return dict(self.multihook.hooks())[self._hooks()[0]]

    def target_width(self) -> int | None:
        return dict(self.multihook.hooks())[self._hooks()[1]] if self.has_target() else None

    def has_target(self) -> bool:
        return len(self._hooks()) == 2

    def ground_truth(self) -> HookSelection:
        return HookSelection(MultiHookData(self.multihook), self._hooks())

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> SyntheticSource:
        # every rank the same stream: data parallel shards it by batch index (ShardedSource)
        data = HookSelection(MultiHookData(self.multihook, run.seed), self._hooks())
        return SyntheticSource(data, run.batch_size)
