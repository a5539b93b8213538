"""ATSS: adaptive training sample selection detectors."""

from detectors.atss.assigner import atss_assign, atss_assign_loop

__all__ = ["atss_assign", "atss_assign_loop"]
