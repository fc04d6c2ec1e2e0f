"""The ML engine: models, checkpoints, data archives, triggers, attention distillation and metrics.

Torch-only by design: nothing here imports web, database or Celery code, so the engine runs the same from the
command line, a test or the worker.
"""
