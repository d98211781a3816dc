"""The one place TensorFlow is imported for training and export.

tf_keras (Keras 2) rather than Keras 3: with Keras 3, tf2onnx turns recurrent layers into ONNX
``Loop`` nodes (5x slower on GPU); with tf_keras it emits fused ``LSTM``/``GRU`` ops.

TensorFlow's native libraries write start-up notices (oneDNN, "failed call to cuInit" on a host without a
GPU) straight to file descriptor 2, past Python's logging; they are silenced while TensorFlow loads and
first looks for devices, unless ``FABWATCH_VERBOSE=1`` (``fabwatch --verbose``).
"""

import os
from contextlib import contextmanager
from typing import Iterator

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    if os.environ.get("FABWATCH_VERBOSE") == "1":
        yield
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _native_stderr_silenced():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

    tf.config.list_physical_devices("GPU")  # the first device query is where cuInit complains

__all__ = ["tf", "keras"]
