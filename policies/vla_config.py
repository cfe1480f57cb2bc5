"""The fields every vision-language-action head's model config shares (the heads: :mod:`policies.vla`)."""
from __future__ import annotations

from dataclasses import dataclass

from bac.errors import ConfigError

from .config_fields import check_transformer, is_kind


@dataclass(frozen=True)
class VLAHeadConfig:
    """Fields every vision-language-action head shares (``policies.vla``): the transformer and its prefix.

    ``cameras`` name the ``observation.images.<camera>`` inputs; ``image_size`` their side in pixels;
    ``crop_pad`` the random-shift augmentation in training (pixels of replicate padding, then a crop
    back to ``image_size``; 0: off).
    """

    width: int = 128
    num_layers: int = 6
    heads: int = 4
    dropout: float = 0.0
    cameras: tuple = ("corner3",)
    image_size: int = 84
    crop_pad: int = 4

    def __post_init__(self) -> None:
        check_transformer(self)
        cameras = self.cameras
        if isinstance(cameras, str) or not cameras or not all(isinstance(c, str) and c for c in cameras):
            raise ConfigError(f"{type(self).__name__}.cameras must be a non-empty list of camera names, got {cameras!r}")
        if len(set(cameras)) != len(cameras):
            raise ConfigError(f"{type(self).__name__}.cameras must be distinct, got {list(cameras)}")
        object.__setattr__(self, "cameras", tuple(cameras))
        if not is_kind(self.image_size, int) or self.image_size < 16:
            raise ConfigError(f"{type(self).__name__}.image_size must be an int >= 16, got {self.image_size!r}")
        if not is_kind(self.crop_pad, int) or not 0 <= self.crop_pad < self.image_size // 4:
            raise ConfigError(f"{type(self).__name__}.crop_pad must be an int in [0, image_size / 4), got {self.crop_pad!r}")
