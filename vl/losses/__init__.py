"""Matching and every VideoLights loss term (span geometry is vl.spans)."""

from vl.losses.criterion import SetCriterion, build_criterion
from vl.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "build_criterion"]
