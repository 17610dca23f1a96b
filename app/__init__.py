"""The NegMerge REST service: FastAPI over PostgreSQL (or SQLite), jobs handed to Celery workers."""
