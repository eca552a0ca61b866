"""Config files and ``--set`` overrides as plain data: YAML or TOML in, a nested mapping out.

Every malformed input is a ``ValueError`` with one line naming the file or the override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path}: cannot read it ({exc})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path}: not valid TOML ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) > 10_000:
        raise ValueError(f"override {key!r}: {part!r} is not a list index")
    if int(part) > len(node):  # one past the end adds an entry; further would leave a gap
        raise ValueError(
            f"override {key!r}: index {part} is past the end of a list of {len(node)} "
            f"(existing entries 0..{len(node) - 1}; {len(node)} adds one)"
        )
    return int(part)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: expected a dotted field path before '='")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: not a YAML value ({_one_line(exc)})") from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                while len(node) <= idx:
                    node.append({})
                node = node[idx]
            elif isinstance(node, dict):
                if isinstance(node.get(part), str):  # a kind's shorthand: expand to set a field
                    node[part] = {"kind": node[part]}
                node = node.setdefault(part, {})
            else:
                break
            if not isinstance(node, (dict, list)):
                where = ".".join(parts[: i + 1])
                raise ValueError(
                    f"override {item!r}: {where} is {node!r}, which has no field {parts[i + 1]!r}"
                )
        last = parts[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, key)
            while len(node) <= idx:
                node.append({})
            node[idx] = value
        elif parts == ["data", "source"] and isinstance(node, dict):
            # imported here: the source registry imports torch, and `saekit --help` must not
            from saekit.data.sources.registry import switch_source

            switch_source(node, value)  # the previous source's fields go with it
        else:
            node[last] = value
    return data
