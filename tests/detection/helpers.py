"""Small helpers shared by the detection tests (an independent numpy IoU)."""

import numpy as np


def numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[N, M]`` of yxyx boxes in float64; 0 where the union is empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    top = np.maximum(a[:, None, 0], b[None, :, 0])
    bottom = np.minimum(a[:, None, 2], b[None, :, 2])
    left = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = area(a)[:, None] + area(b)[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
