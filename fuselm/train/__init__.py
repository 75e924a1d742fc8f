"""Training of the target (stage 5): the sparse combined loss.

Only the pure loss functions are exported here so that importing them does not pull in
``transformers``; the trainer lives in its own module.
"""

from fuselm.train.losses import (
    IGNORE_INDEX,
    clm_loss,
    combined_loss,
    fusion_loss,
    shifted_target_mask,
)

__all__ = ["IGNORE_INDEX", "clm_loss", "combined_loss", "fusion_loss", "shifted_target_mask"]
