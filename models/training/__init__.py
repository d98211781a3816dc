"""From a file to a registered model: data loading, windowing and scaling (``data``), synthetic fab data
(``synth``), training and export (``train``), thresholds and calibration (``calibrate``), metrics.

``data``, ``calibrate`` and ``metrics`` are numpy-only, so serving-side tools may use them; ``train``
imports TensorFlow.
"""
