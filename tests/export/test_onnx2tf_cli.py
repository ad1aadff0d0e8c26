"""``tools/onnx2tf/onnx2tf_cli.py``'s ``tf.nn.depthwise_conv2d`` takes the 4-element dilations
onnx2tf 2.6.9 passes (``[1, h, w, 1]``) and gives TensorFlow's own result for ``[h, w]``; 2-element
dilations are unchanged. Run in a subprocess: importing the module replaces
``tf.nn.depthwise_conv2d`` in that process."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT / "tools" / "onnx2tf")!r})
import numpy as np
import tensorflow as tf
original = tf.nn.depthwise_conv2d
import onnx2tf_cli
assert tf.nn.depthwise_conv2d is onnx2tf_cli.depthwise_conv2d
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(1, 9, 9, 4)), tf.float32)
w = tf.constant(rng.normal(size=(3, 3, 4, 1)), tf.float32)
expected = original(x, w, [1, 1, 1, 1], "SAME", dilations=[2, 2]).numpy()
four = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME", dilations=[1, 2, 2, 1]).numpy()
two = tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME", dilations=[2, 2]).numpy()
assert np.array_equal(four, expected) and np.array_equal(two, expected)
assert not np.allclose(expected, original(x, w, [1, 1, 1, 1], "SAME").numpy())
print("OK")
"""


def test_depthwise_conv2d_takes_four_element_dilations():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
