"""The data source config family: one kind per source, chosen by ``data.source``.

Each kind (a module of this package, listed in :mod:`saekit.data.sources.registry`) owns its
fields, their validation, the widths it yields, the provenance an SAE records and the batch
source it builds, so nothing outside ``saekit.data`` asks which source a run uses. A field of
another source is refused with one line (``data.model means nothing for data.source
'synthetic'``).

Run configs written before sources owned their config (one flat ``data:`` section holding every
source's fields: a run directory's config.yaml and checkpoint) still load: a field of another
source is dropped when it holds its default, the value those files carry; any other value is
refused. ``--set data.source=KIND`` switches kind, taking the old kind's fields with it
(:meth:`SourceConfig.switch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from saekit.core.configs import KindConfig, to_dict
from saekit.data.sources.distributed import (
    BroadcastComm,
    BroadcastSource,
    RowSliceSource,
    ShardedSource,
)
from saekit.data.sources.interface import ActivationSource, StreamSettings


class SourceConfig(KindConfig):
    """Where a run's activations come from (``data:`` of a run config)."""

    family = "data source"
    kind_key = "source"
    default_kind: ClassVar[str] = "synthetic"
    """The kind of a ``data:`` section that names none."""

    @classmethod
    def parse(cls, value: Any, where: str) -> KindConfig:
        if isinstance(value, dict):
            value = dict(value)
            kind = value.setdefault(cls.kind_key, cls.default_kind)
            if isinstance(kind, str) and kind in cls._kinds:
                for name in _foreign_fields(cls._kinds, kind, value, where):
                    del value[name]
        return super().parse(value, where)

    @classmethod
    def switch(cls, section: dict[str, Any], kind: Any) -> None:
        """Make ``section`` (a ``data:`` mapping) name source ``kind``, dropping the fields the
        new kind does not have (``--set data.source=cache`` on a synthetic config leaves no
        ``synthetic:`` behind); an unknown kind is left for parsing to refuse."""
        known = isinstance(kind, str) and kind in cls._kinds
        if known and section.get(cls.kind_key, cls.default_kind) != kind:
            own = {f.name for f in dataclasses.fields(cls._kinds[kind])}
            for name in [n for n in section if n not in own]:
                del section[name]
        section[cls.kind_key] = kind

    # ------------------------------------------------------------------------ what a kind owns
    def validate(self) -> None:
        """Raise ValueError naming the offending ``data.`` field."""

    def describe(self) -> str:
        """Where the activations come from, for messages."""
        raise NotImplementedError

    def input_width(self) -> int | None:
        """The width of the activations (an SAE's d_in), when the config or the source's own
        check (a cache's manifest) tells it; None when only the model does (``model_width``)."""
        return None

    def target_width(self) -> int | None:
        """A transcoder stream's target width (d_out), None when there is no target or only
        the model tells it (``has_target`` says which)."""
        return None

    def has_target(self) -> bool:
        """Whether batches are [input | target] (a transcoder's stream)."""
        return False

    def hook_groups(self) -> tuple[list[str], list[str]] | None:
        """The hooks a run trains on as (inputs, targets), their columns in that order
        (saekit.data.hook_columns); None for a source without named hooks (synthetic data)."""
        return None

    def hook_width(self, name: str) -> int | None:
        """The width of one selected hook when known without a model (a cache's manifest),
        else None (``model_width`` then)."""
        return None

    def model_width(self) -> int:
        """The width a model's hook has by default (its hidden size; reads its config)."""
        raise NotImplementedError(f"data.source {self.kind!r} runs no model")

    def origin(self) -> dict[str, str]:
        """SAE config fields naming where the activations come from (model_name, hook,
        target_hook), so saved SAEs describe themselves; empty for synthetic data."""
        return {}

    def provenance(self, eval_tokens: int) -> dict[str, Any] | None:
        """What an SAE trained on this source records in ``metadata.training_data`` (the
        documents it trained on and held out: saekit.data.documents.held_out); None: nothing."""
        return None

    def context_size(self) -> int | None:
        """Tokens per model context, when the run chose it (exported as SAELens' context_size)."""
        return None

    def input_paths(self) -> list[tuple[str, str | None]]:
        """(field, path) of every file or directory the source reads: a run's out_dir must not
        be, or lie inside, one of them (saekit.core.paths)."""
        return []

    def ground_truth(self) -> Any:
        """The known features behind the data (``directions``, ``batch``), None for real data."""
        return None

    def build(self, run: StreamSettings, rank: int = 0, world_size: int = 1) -> ActivationSource:
        """The batch source; with ``world_size`` > 1, rank ``rank``'s share of the stream."""
        raise NotImplementedError

    # ---------------------------------------------------------------- several processes
    def sweep_source(self, run: StreamSettings, comm: BroadcastComm) -> ActivationSource:
        """Sweep parallel (every rank sees the whole batch): rank 0 reads, the rest receive."""
        return BroadcastSource(self.build(run) if comm.is_main else None, comm)

    def data_parallel_sources(
        self, run: StreamSettings, rank: int, world_size: int
    ) -> tuple[ActivationSource, ActivationSource]:
        """Data parallel (``run.batch_size``: one rank's share): (training source, evaluation
        source); a stream source splits itself by (rank, world_size)."""
        source = self.build(run, rank, world_size)
        return source, source

    def latent_parallel_sources(
        self, run: StreamSettings, part: int, parts: int, group: BroadcastComm
    ) -> tuple[ActivationSource, ActivationSource | None]:
        """Latent parallelism (saekit.train.mesh; ``run.batch_size``: the whole batch): data
        group ``part`` of ``parts`` trains on its share; in its latent group ``group`` (whose
        ranks need the same batches) rank 0 reads and broadcasts. A stream splits itself by
        (part, parts), as under data parallelism. (training source, evaluation source: the
        group's rank 0's own, None elsewhere)."""
        local = dataclasses.replace(run, batch_size=run.batch_size // parts)
        source = self.build(local, part, parts) if group.is_main else None
        if group.world_size == 1:
            return source, source  # type: ignore[return-value]
        return BroadcastSource(source, group), source


class GeneratedSourceConfig(SourceConfig):
    """A source whose batch i is a pure function of (seed, i): every rank generates what it
    needs itself, cheaper than sending it."""

    def sweep_source(self, run: StreamSettings, comm: BroadcastComm) -> ActivationSource:
        return self.build(run)

    def data_parallel_sources(
        self, run: StreamSettings, rank: int, world_size: int
    ) -> tuple[ActivationSource, ActivationSource]:
        evaluation = self.build(run)
        return ShardedSource(evaluation, rank, world_size), evaluation  # type: ignore[arg-type]

    def latent_parallel_sources(
        self, run: StreamSettings, part: int, parts: int, group: BroadcastComm
    ) -> tuple[ActivationSource, ActivationSource | None]:
        """Every rank generates the whole batch and trains on its data group's rows of it, so
        the batches are one process's whatever the mesh (a resume on another shape reads the
        same tokens)."""
        whole = self.build(run)
        return RowSliceSource(whole, part, parts), whole  # type: ignore[arg-type]


def _foreign_fields(
    kinds: dict[str, type], kind: str, section: dict[str, Any], where: str
) -> list[str]:
    """The fields of ``section`` that belong to another kind and hold that kind's default
    (dropped); one that holds anything else is refused, as is one no kind has."""
    own = {f.name for f in dataclasses.fields(kinds[kind])}
    dropped = []
    for name, value in section.items():
        if name in own or name == SourceConfig.kind_key:
            continue
        owners = [
            f for k in kinds.values() for f in dataclasses.fields(k) if f.name == name
        ]  # fmt: skip
        if not owners:
            raise ValueError(f"{where}: unknown field(s) {[name]}")
        if any(_default(f) is not _NO_DEFAULT and _same(_default(f), value) for f in owners):
            dropped.append(name)
            continue
        raise ValueError(f"{where}.{name} means nothing for {where}.source {kind!r}")
    return dropped


_NO_DEFAULT = object()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def _same(default: Any, value: Any) -> bool:
    return to_dict(default) == value
