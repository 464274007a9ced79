"""Flower's run config ⇄ fedlora's :class:`~fedlora.config.RunConfig`.

``pyproject.toml`` ``[tool.flwr.app.config]`` holds every fedlora key under its
dotted name (``fed.method``, ``model.rank``, …), so ``flwr run . --run-config
"fed.method='fedex' fed.rounds=3"`` overrides any of them. Flower values are
scalars only, so lists are comma-separated strings (``model.target_modules =
"query,value"``) and mappings YAML strings (``fed.options = "{}"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, config_from_dict, config_to_dict

__all__ = ["config_from_run_config", "run_config_entries"]


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from Flower's flat ``context.run_config``
    (raises :class:`~fedlora.config.ConfigError` naming the bad key)."""
    data: dict[str, Any] = {}
    for key, value in run_config.items():
        parts = str(key).split(".")
        if not all(parts) or len(parts) > 2:
            raise ConfigError(f"run-config key {key!r} is not a fedlora key (section.key or key)")
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"run-config {key} = {value!r} is not a valid mapping") from None
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(data)


def run_config_entries(cfg: RunConfig | None = None) -> dict[str, Any]:
    """fedlora's config as flat Flower run-config entries (what pyproject.toml lists)."""
    out: dict[str, Any] = {}
    for key, value in config_to_dict(cfg or RunConfig()).items():
        for k, v in value.items() if isinstance(value, dict) else [(None, value)]:
            name = key if k is None else f"{key}.{k}"
            if isinstance(v, list):
                v = ",".join(str(x) for x in v)
            elif isinstance(v, dict):
                v = yaml.safe_dump(v, default_flow_style=True).strip()
            out[name] = v
    return out
