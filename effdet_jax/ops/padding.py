"""TensorFlow's ``SAME`` padding, which the automl and timm ``tf_*`` checkpoints were trained with."""

from __future__ import annotations


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one spatial axis: the output has ceil(size/stride)
    positions and the odd pixel of padding goes after (for stride 2 on an even size: 0 before,
    1 after)."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def same_pads(shape: tuple[int, ...], kh: int, kw: int, stride: int, dilation: int = 1) -> tuple[
        tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` SAME padding of an ``[N, H, W, C]`` input."""
    return tf_same_padding(shape[1], kh, stride, dilation), tf_same_padding(shape[2], kw, stride, dilation)
