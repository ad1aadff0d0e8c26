"""onnx2tf's command line, run with the onnx2tf venv's Python (``effdet_jax/export/litert.py``
calls it with onnx2tf's own flags), with one fix to how onnx2tf 2.6.9 calls TensorFlow.

onnx2tf's ``flatbuffer_direct`` SavedModel export (``-fdosm``) runs each LiteRT op with the
matching TF op; for ``DEPTHWISE_CONV_2D`` it passes ``dilations`` to
``tf.nn.depthwise_conv2d`` in the 4-element ``[1, h, w, 1]`` form that ``tf.nn.conv2d`` takes,
while ``tf.nn.depthwise_conv2d`` takes the 2-element ``[h, w]`` and otherwise raises
"``input.shape.rank`` must be at least 5". ``tf.nn.depthwise_conv2d`` here takes both forms;
2-element dilations pass through unchanged, so a fixed onnx2tf runs as before.
"""

import sys

import tensorflow as tf

_depthwise_conv2d = tf.nn.depthwise_conv2d


def depthwise_conv2d(input, filter, strides, padding, data_format=None, dilations=None, name=None):
    """``tf.nn.depthwise_conv2d``, also taking 4-element dilations in ``data_format`` order."""
    if dilations is not None and len(dilations) == 4:
        spatial = slice(2, 4) if str(data_format).startswith("NC") else slice(1, 3)
        dilations = list(dilations)[spatial]
    return _depthwise_conv2d(input, filter, strides, padding, data_format=data_format,
                             dilations=dilations, name=name)


tf.nn.depthwise_conv2d = depthwise_conv2d

if __name__ == "__main__":
    from onnx2tf import main

    sys.exit(main())
