"""Benchmarks of the training side: inference of the exported ensemble (``inference``, with a PyTorch
reference in ``torch_reference``) and retrain time at growing data sizes (``retrain``).
"""
