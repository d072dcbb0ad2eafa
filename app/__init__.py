"""modelpress: model compression as a service (API, shared schemas, storage, database)."""
