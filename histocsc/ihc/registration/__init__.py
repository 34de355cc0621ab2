"""Align an IHC section (moving) to its H&E serial section (fixed) at low resolution.

The flow, one module per step: `images` (thumbnails and the shared stain channel),
`features` (SIFT matches), `search` (initial pose hypotheses judged by image similarity),
`refine` (ECC affine, optical-flow non-rigid), `qc` (error estimate and the poor flag),
`overlay` (overlay.png) and `pipeline` (the whole, and the Transform it returns).
"""

from histocsc.ihc.registration.config import (
    RegistrationConfig,
    RegistrationFailure,
    RegistrationResult,
    save_failure,
)
from histocsc.ihc.registration.pipeline import (
    register,
    register_arrays,
    register_images,
    warp_moving_region,
)

__all__ = [
    "RegistrationConfig",
    "RegistrationFailure",
    "RegistrationResult",
    "register",
    "register_arrays",
    "register_images",
    "save_failure",
    "warp_moving_region",
]
