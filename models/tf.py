"""The one place TensorFlow is imported for training and export.

tf_keras (Keras 2) rather than Keras 3: with Keras 3, tf2onnx turns recurrent layers into ONNX
``Loop`` nodes (5x slower on GPU); with tf_keras it emits fused ``LSTM``/``GRU`` ops.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras"]
