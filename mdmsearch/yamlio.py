"""YAML loading shared by run configs and search specs: safe, line numbers kept for every
mapping key (errors can point at the line), and duplicate keys rejected (YAML's "last one
wins" silently drops a setting)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from yaml.constructor import ConstructorError

from .errors import ConfigError, MDMError


class LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and refuses duplicates."""


def _construct_mapping(loader, node, deep=False):
    mapping, lines = {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            seen = key in lines
        except TypeError:  # unhashable key: let the normal error path report it
            seen = False
        if seen:
            raise ConstructorError(None, None, f"duplicate key {key!r} (first on line {lines[key]})",
                                   key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = line
    loader.mdm_lines[id(mapping)] = lines
    return mapping


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_text(text: str, source: str, what: str = "file") -> tuple[dict, dict]:
    """Parse YAML text into (mapping, lines); ``lines[id(sub_mapping)][key]`` is a key's line.
    Every failure is one ConfigError line naming ``source`` (and the YAML line)."""
    loader = LineLoader(text)
    loader.mdm_lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{source}:{where} invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{source}: empty {what}")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return data, loader.mdm_lines


def read_text(path: str | Path, what: str = "file") -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc}") from None


def line_of(data: dict, lines: dict, loc: tuple) -> Optional[int]:
    """The YAML line of the deepest key of ``loc`` found in ``data``."""
    node, line = data, None
    for part in loc:
        if isinstance(node, dict) and part in node:
            line = lines.get(id(node), {}).get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line


def read_saved_config(path: Path, what: str, missing: str) -> dict:
    """A run's saved ``config.yaml`` as a dict; one MDMError line starting with ``what`` when it is
    missing (``missing`` says what that means), unreadable or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise MDMError(f"{what}: {path} is missing ({missing})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MDMError(f"{what}: {path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise MDMError(f"{what}: {path} is not a run config")
    return data
