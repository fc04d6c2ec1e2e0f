"""Code shared by the command line, the API and the worker.

`core.engine` is the torch-only ML engine; `core.params` is the job schema every side validates with; the job
records, storage and settings sit beside them. Importing `core` itself imports nothing heavy.
"""
