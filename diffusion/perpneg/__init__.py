"""Perp-Neg negative-prompt guidance for 2D diffusion, view-conditioned prompts and text-to-3D (SDS).

Heavy pieces (the diffusers pipeline, SDS, 3D) are imported from their modules:
``diffusion.perpneg.pipeline``, ``.views``, ``.sds``, ``.grid3d``.
"""

from .guidance import perp_composition, perp_neg_guidance, perpendicular_component

__all__ = ["perpendicular_component", "perp_neg_guidance", "perp_composition"]
