"""``bac-serve``: serve a policy over websockets (openpi's message shape) until SIGINT/SIGTERM.

    bac-serve checkpoint=dpt-metaworld sampler.kind=ddim sampler.steps=4 method=uniform method_params={interval:2}
    bac-serve ... compile=whole                                   # the sampling call as one torch.compile graph
    bac-serve ... compile=whole backend=onnxruntime onnx=model.onnx   # a bac-export file in ONNX Runtime
    bac-serve ... warm={start:2}                                  # calls begin from the session's last chunk
    bac-serve ... rtc={max_guidance:5}                            # real-time chunking: calls continue the last chunk
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf

from bac.apps.common import report_errors
from bac.configs import CONFIG_DIR
from bac.configs.settings import FLOAT, INT, STR, check_settings
from bac.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _settings() -> dict:
    return {
        "checkpoint": (STR, None, False), "device": (STR, None, False), "sampler.kind": (STR, None, True),
        "sampler.steps": (INT, 1, True), "tuned": (STR, None, True), "plan": (STR, None, True),
        "method": (STR, None, True), "host": (STR, None, False), "port": (INT, 0, False), "seed": (INT, 0, False),
        "warmup": (INT, 0, False), "threads": (INT, 1, True), "max_message_mb": (INT, 1, False),
        "shutdown_timeout_s": (FLOAT, 0, False), "log_level": (STR, None, False), "api_key": (STR, None, True),
        "language_cache_size": (INT, 1, True), "compile": (STR, None, False), "backend": (STR, None, False),
        "onnx": (STR, None, True), "warm.start": (INT, 0, False), "warm.variant": (STR, None, True),
        "warm.threshold": (FLOAT, None, True), "warm.jump": (FLOAT, None, True),
        "rtc.max_guidance": (FLOAT, 0, True),
    }


def _server_class() -> type:
    """:class:`bac.runtime.server.PolicyServer`, imported here so that ``--help`` works without the ``serve`` extra."""
    try:
        import msgpack  # noqa: F401 -- the 'serve' extra, checked before the policy is loaded
        import websockets  # noqa: F401

        from bac.runtime.server import PolicyServer
    except ModuleNotFoundError as err:
        if err.name not in ("msgpack", "websockets"):
            raise
        raise ConfigError(f"bac-serve needs the 'serve' extra ({err.name} is not installed): "
                          "pip install 'bac[serve]'") from err
    return PolicyServer


def serve(cfg: Any) -> None:
    """Check ``configs/serve.yaml``'s settings, load the policy, serve until SIGINT/SIGTERM."""
    check_settings(cfg, _settings(), CONFIG_DIR / "serve.yaml")
    if not isinstance(cfg.method_params, Mapping) and cfg.method_params is not None:
        raise ConfigError(f"setting method_params must be a mapping (method_params={{interval:2}}), got "
                          f"{cfg.method_params!r}")
    if not isinstance(cfg.warm, Mapping) and cfg.warm is not None:
        raise ConfigError(f"setting warm must be a mapping (warm={{start:2}}) or null, got {cfg.warm!r}")
    if not isinstance(cfg.rtc, Mapping) and cfg.rtc is not None:
        raise ConfigError(f"setting rtc must be a mapping (rtc={{max_guidance:5}}, or rtc={{}} for the defaults) or "
                          f"null, got {cfg.rtc!r}")
    if cfg.port > 65535:
        raise ConfigError(f"setting port must be <= 65535, got {cfg.port}")
    if str(cfg.log_level).lower() not in LOG_LEVELS:
        raise ConfigError(f"setting log_level must be one of {', '.join(LOG_LEVELS)}, got {cfg.log_level!r}")
    if cfg.api_key is not None and not cfg.api_key.strip():
        raise ConfigError("setting api_key is empty: set a key, or null for none (BAC_SERVE_API_KEY sets it too)")
    server_class = _server_class()
    logging.basicConfig(level=str(cfg.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # latency: one thread is the stable choice on a shared CPU
    settings = OmegaConf.to_container(cfg, resolve=True)
    server_class.from_config(settings).serve_forever()  # logs its address once listening


def main() -> None:
    """``bac-serve``: Hydra config ``configs/serve.yaml``."""
    hydra.main(config_path=str(CONFIG_DIR), config_name="serve", version_base="1.3")(report_errors(serve))()


if __name__ == "__main__":
    main()
