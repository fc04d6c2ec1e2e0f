"""Code shared by the command line, the API and the worker.

`core.engine` is the torch-only ML engine; `core.params` is the job schema every side validates with; the job
records, storage and settings sit beside them. Importing `core` itself imports nothing heavy.
"""

from importlib.metadata import version

# One version for the package, `nad --version` and the API's OpenAPI description: pyproject.toml's.
__version__ = version("nad-service")
