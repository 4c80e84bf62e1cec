"""Device-side view augmentation (placeholder until the GPU augmentation lands: issue 5).

Public API (kept by the full implementation):
- ``SimSiamAugment(**aug_section, out_dtype=torch.float32, channels_last=True)`` and
  ``SimSiamAugment.from_config(aug_cfg, **kw)``: ``aug(batch, generator=None) -> (v1, v2)``.
  Floating views (already augmented by the PIL reference loader) pass through unchanged
  except for dtype and memory format.
- ``to_normalized(img_uint8, mean, std, dtype)``: uint8 -> normalized float (evaluation).
"""
