"""Extraction settings: the `extraction:` section of delf_config.yaml as a typed object."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

DEFAULT_IMAGE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


@dataclass(frozen=True)
class ExtractionConfig:
    """How DELF local features are extracted (defaults: the TF reference's delf_config_example)."""

    image_scales: tuple[float, ...] = DEFAULT_IMAGE_SCALES
    max_feature_num: int = 1000
    score_threshold: float = 100.0
    iou_threshold: float = 1.0
    max_image_size: int = -1
    min_image_size: int = -1
    use_pca: bool = True
    pca_dim: int = 40
    use_whitening: bool = False
    pca_mean_path: str = "pca/mean.npy"
    pca_projection_path: str = "pca/pca_proj_mat.npy"
    pca_variances_path: str = "pca/pca_variances.npy"
    receptive_field: float = 291.0
    stride: float = 32.0
    padding: float = 145.0
    # Largest number of pixels a single pyramid level may have; bigger images are
    # downscaled with a warning instead of exhausting memory at scale 2.0.
    max_pixels_per_scale: int = 16_000_000
    feature_depth: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_scales", tuple(float(s) for s in self.image_scales))
        problems = []
        if not self.image_scales or any(s <= 0 for s in self.image_scales):
            problems.append("image_scales must be a non-empty list of positive numbers")
        if self.max_feature_num <= 0:
            problems.append("max_feature_num must be positive")
        if not 0.0 < self.iou_threshold <= 1.0:
            problems.append("iou_threshold must be in (0, 1]")
        if self.use_pca and self.pca_dim <= 0:
            problems.append("pca_dim must be positive")
        if problems:
            raise ValueError("invalid extraction settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> ExtractionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown extraction setting(s): {', '.join(unknown)}")
        return cls(**values)

    def settings_hash(self, checkpoint_id: str = "") -> str:
        """Stable hash of everything that changes the extracted features."""
        payload = dataclasses.asdict(self)
        payload["checkpoint"] = checkpoint_id
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
