"""What the API process serves over HTTP: the FastAPI app, routers, request and response bodies,
uploads and downloads, per-tenant limits, and its background housekeeping."""
