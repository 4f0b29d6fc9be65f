"""Side-by-side timing scripts (``python -m benchmarks.cpu``, ``python -m benchmarks.gpu``)."""
