"""The worker: a Celery app that takes job ids off the broker and runs the engine on them."""
