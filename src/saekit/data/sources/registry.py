"""Every data source kind. Importing a kind's module registers it with ``SourceConfig``; adding a
source is its module in this package (a ``SourceConfig`` subclass and its batch source) and its
name on the import line below (tests/data/test_data_sources.py checks that every kind has its module
and every module its kind)."""

from __future__ import annotations

from typing import Any, cast

from saekit.data.sources import cache, hf, multihook, synthbench, synthetic  # noqa: F401  (registers them)
from saekit.data.sources.config import SourceConfig


def source_config(value: Any, where: str = "data", validate: bool = True) -> SourceConfig:
    """A source config from a ``data:`` section (a mapping, a kind name or an instance), checked
    unless ``validate`` is False (reading a finished run's config.yaml, whose files may be gone);
    errors name the field by its path under ``where``."""
    config = cast(SourceConfig, SourceConfig.parse(value, where))
    if validate:
        config.validate()
    return config


def switch_source(section: dict[str, Any], kind: Any) -> None:
    """``--set data.source=KIND``: the section names ``kind``, without the fields of the source
    it named before that ``kind`` does not have (see ``SourceConfig.switch``)."""
    SourceConfig.switch(section, kind)
