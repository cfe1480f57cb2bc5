"""Settings checked before any work starts: unknown keys, wrong types and out-of-range values are one clear error.

Every command's Hydra config (this folder) lists its settings; each command declares a rule per setting.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from bac.errors import ConfigError

# A setting's rule: (accepted types, smallest value or None, may be null).
SettingRule = tuple[tuple[type, ...], "float | None", bool]
INT, FLOAT, BOOL, STR, SEQ = (int,), (int, float), (bool,), (str,), (list, ListConfig)


def _describe(kinds: tuple[type, ...]) -> str:
    return {INT: "an integer", FLOAT: "a number", BOOL: "true or false", STR: "a string", SEQ: "a list"}.get(kinds, str(kinds))


def check_settings(cfg: DictConfig, rules: Mapping[str, SettingRule], config_file: Path) -> None:
    """Refuse unknown keys, wrong types and out-of-range values before any work starts.

    ``rules`` maps dotted keys (``"sampler.steps"``) to their rule; keys of ``cfg`` that are neither
    in ``config_file`` nor in ``rules`` were added with ``+key=...`` and are most likely typos.
    """
    primary = OmegaConf.load(config_file)
    groups = {str(k).removeprefix("override ") for entry in primary.get("defaults", []) if isinstance(entry, Mapping)
              for k in entry}
    known = (set(primary.keys()) - {"defaults"}) | groups | {key.split(".")[0] for key in rules} | {"hydra"}
    for key in cfg.keys():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(sorted(known - {'hydra'}))}"
            raise ConfigError(f"unknown setting {key!r} (not in {config_file.name}){hint}")
    for key, (kinds, minimum, nullable) in rules.items():
        value = OmegaConf.select(cfg, key, default="<missing>")
        if isinstance(value, str) and value == "<missing>":
            continue  # optional groups (a policy config without this field) are checked where they are read
        if value is None:
            if nullable:
                continue
            raise ConfigError(f"setting {key} must be {_describe(kinds)}, got null")
        # bool is an int subclass: true is not a step count, 1 is not a switch
        wrong_bool = isinstance(value, bool) != (kinds == BOOL)
        if wrong_bool or not isinstance(value, kinds):
            raise ConfigError(f"setting {key} must be {_describe(kinds)}, got {value!r} ({type(value).__name__})")
        if minimum is not None and value < minimum:
            raise ConfigError(f"setting {key} must be >= {minimum:g}, got {value!r}")
