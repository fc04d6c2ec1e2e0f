"""The HTTP API: validation, authentication, uploads to disk, job records. No torch, no unpickling: uploads
are only streamed to disk here and parsed by the worker."""
