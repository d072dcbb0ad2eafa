"""modelpress workers: Celery tasks that inspect models and run compression recipes (torch lives here)."""
