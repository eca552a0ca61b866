"""``data.source: multihook``: a synthetic stream of several hooks with a known map between
them (:mod:`saekit.data.synthetic.multihook`: cross-layer transcoder and crosscoder ground
truth), settings under ``data.multihook``.

Like a cache of several hooks, a run chooses what it trains on (saekit.data.hook_columns):
``data.input_hooks`` + ``data.target_hooks`` (a cross-layer transcoder's inputs and targets),
``data.input_hooks`` alone (a crosscoder's sources), ``data.hook`` (an SAE) or ``data.hook`` +
``data.target_hook`` (a transcoder, e.g. one layer's per-layer transcoder); with none, a world
of 2 hooks gives the transcoder from the first to the second and one of 3 or more is refused.
An SAE's or transcoder's evaluation scores recovery against the vectors the true features
write into its hook (the target's, for a transcoder); a CLT's or crosscoder's recovery is
scored from the world itself (benchmarks/bench_clt.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saekit.data.hook_columns import hook_groups, selected_hooks
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
    input_hooks: list[str] | None = None
    """A dictionary over several hooks: a cross-layer transcoder's inputs, layer by layer, or
    a crosscoder's sources."""
    target_hooks: list[str] | None = None
    """A cross-layer transcoder's targets, in the order of ``input_hooks``."""

    def validate(self) -> None:
        self._hooks()
        if isinstance(self.multihook, CLTWorldConfig) and self.target_hooks:
            self._check_layer_order()

    def _check_layer_order(self) -> None:
        """A CLT's layer i reads input i and writes target i and every later target: on the CLT
        world, input i and target i must be one layer's, the layers increasing (else latents
        would write into earlier layers of the world, silently)."""
        names = [name for name, _ in self.multihook.hooks()]
        L = self.multihook.n_layers
        layers = [
            (names.index(i), names.index(t) - L)
            for i, t in zip(self.input_hooks or [], self.target_hooks or [], strict=True)
        ]
        ins = [a for a, _ in layers]
        if any(a != b for a, b in layers) or ins != sorted(set(ins)):
            raise ValueError(
                f"data.input_hooks {self.input_hooks} and data.target_hooks {self.target_hooks}:"
                " a cross-layer transcoder's input i and target i must be one layer's, the"
                " layers in increasing order"
            )

    def _hooks(self) -> list[str]:
        """The hooks the run trains on, inputs then targets."""
        names = [name for name, _ in self.multihook.hooks()]
        return selected_hooks(names, self.hook, self.target_hook, self.describe(),
                              self.input_hooks, self.target_hooks)  # fmt: skip

    def hook_groups(self) -> tuple[list[str], list[str]]:
        return hook_groups(self._hooks(), self.input_hooks)

    def hook_width(self, name: str) -> int:
        return dict(self.multihook.hooks())[name]

    def describe(self) -> str:
        return f"the synthetic {self.multihook.kind} world (data.multihook)"

    def input_width(self) -> int:
        return self.hook_width(self.hook_groups()[0][0])

    def target_width(self) -> int | None:
        targets = self.hook_groups()[1]
        return self.hook_width(targets[0]) if targets else None

    def has_target(self) -> bool:
        return bool(self.hook_groups()[1])

    def ground_truth(self) -> HookSelection | None:
        """The truth an SAE or transcoder is scored against; None for a dictionary over more
        hooks (a CLT's or crosscoder's truth is the world itself, :class:`MultiHookData`)."""
        return (
            HookSelection(MultiHookData(self.multihook), self._hooks()) if self._scored() else None
        )

    def _scored(self) -> bool:
        return self.input_hooks is None  # data.hook (+ data.target_hook): an SAE, a transcoder

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> MultiHookSource:
        # every rank the same stream: data parallel shards it by batch index (ShardedSource)
        data = HookSelection(MultiHookData(self.multihook, run.seed), self._hooks())
        return MultiHookSource(data, run.batch_size, self._scored())


class MultiHookSource(SyntheticSource):
    """The selected hooks' columns of a world's batches."""

    def __init__(self, data: HookSelection, batch_size: int, scored: bool):
        super().__init__(data, batch_size)
        self.scored = scored

    def known_features(self) -> HookSelection | None:
        """The truth of an SAE's or transcoder's hook (saekit.train.outputs scores its decoder
        rows against it); None for a CLT or crosscoder."""
        return self.data if self.scored else None
