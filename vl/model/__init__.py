"""The VideoLights network."""

from vl.model.videolights import ModelOutput, VideoLights, build_model

__all__ = ["ModelOutput", "VideoLights", "build_model"]
