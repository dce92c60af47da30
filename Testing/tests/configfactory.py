"""Training configs for the tests: a base config with `section__field` overrides, written as YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

# A one-block-per-stage MambaOut: lists, as YAML writes them (the configs' own form)
TINY_ENCODER = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}


def write_config(folder: Path, name: str, cfg: dict, overrides: dict) -> Path:
    """`cfg` with each `section__field=value` of `overrides` set, written to folder/<name>.yaml."""
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
