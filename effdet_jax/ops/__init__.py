"""Array-level operations of the models, each with the backward pass it needs for speed.

Activations are ``[batch, height, width, channels]`` (NHWC) and kernels HWIO (``[kh, kw, in,
out]``; depthwise ``[kh, kw, 1, channels]``). The flax modules in ``effdet_jax.models`` call these.

* ``policy``: the CPU-kernel switch (``auto`` | ``off`` | ``require``).
* ``padding``: TensorFlow's ``SAME`` padding.
* ``depthwise``: depthwise convolution (grouped conv, shift-and-add, FFI kernel) and their VJPs.
* ``conv``: dense convolution (stem kernel gradient as a patch matmul) and 1x1 as a matmul.
* ``pool``: max pooling with TF ``SAME`` padding and a tap-by-tap backward pass.
* ``resize``: TF1's legacy nearest-neighbour resize.
* ``batch_norm``: batch norm + swish as one op (train and eval mode).
"""
