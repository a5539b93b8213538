"""Maintenance scripts for clip_ood (not imported at run time)."""
