"""A minimal NumPy box list: boxes as [ymin, xmin, ymax, xmax] rows plus named per-box fields.

It plays the role of the TF object_detection `np_box_list.BoxList` that DELF keypoint selection
uses, without that package (and its compiled protos) as a dependency.
"""

from __future__ import annotations

import numpy as np


class BoxList:
    """(N, 4) boxes in [ymin, xmin, ymax, xmax] order with extra per-box arrays such as 'scores'."""

    def __init__(self, boxes: np.ndarray) -> None:
        boxes = np.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
        if not np.issubdtype(boxes.dtype, np.floating):
            boxes = boxes.astype(np.float64)
        self._boxes = boxes
        self._fields: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self._boxes.shape[0]

    @property
    def boxes(self) -> np.ndarray:
        """The (N, 4) box array."""
        return self._boxes

    def add_field(self, name: str, values: np.ndarray) -> None:
        """Attach one value (or row) per box under `name`."""
        values = np.asarray(values)
        if values.ndim == 0 or values.shape[0] != len(self):
            raise ValueError(f"field {name!r} needs {len(self)} entries, got shape {values.shape}")
        self._fields[name] = values

    def has_field(self, name: str) -> bool:
        return name in self._fields

    def get_field(self, name: str) -> np.ndarray:
        if name not in self._fields:
            raise KeyError(f"box list has no field {name!r} (fields: {sorted(self._fields)})")
        return self._fields[name]

    def field_names(self) -> list[str]:
        return sorted(self._fields)

    def gather(self, indices: np.ndarray) -> BoxList:
        """A new BoxList with the boxes (and every field) at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        subset = BoxList(self._boxes[indices])
        for name, values in self._fields.items():
            subset.add_field(name, values[indices])
        return subset
