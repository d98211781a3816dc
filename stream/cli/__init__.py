"""The ``fabwatch`` command line: ``main`` builds the app, each area registers its commands from its own
module (``serve``, ``logs``, ``train``), ``options`` holds the shared options, ``demo`` drives ``make demo``.

Module-level imports stay light: anything heavy (TensorFlow above all) is imported inside the command
that needs it, so ``fabwatch --help`` and the serving commands start fast on the serving install.
"""
