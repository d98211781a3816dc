"""The ensemble's members, one module per architecture: ``NAME``, ``DESIGN_PARAMS`` and ``trunk``. The
task head and the gate are in ``fabwatch.models.common`` and ``fabwatch.models.ensemble``.

TensorFlow only through ``fabwatch.models.tf``.
"""
