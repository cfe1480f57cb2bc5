"""Hydra configs of the robot-side commands (``bac-eval``, ``bac-train``, ``bac-collect``), shipped as package data."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
