"""Vetting of uploaded bytes (model files, archives, datasets), pure stdlib + numpy: the API runs it at upload
and the worker again before it opens anything."""
