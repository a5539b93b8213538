"""ATSS: adaptive training sample selection detectors."""

from detectors.atss.assigner import atss_assign, atss_assign_dense, atss_assign_loop
from detectors.atss.head import ATSSHead, Scale
from detectors.atss.model import ATSS, centerness_targets, grid_anchors

__all__ = ["ATSS", "ATSSHead", "Scale", "atss_assign", "atss_assign_dense", "atss_assign_loop", "centerness_targets", "grid_anchors"]
