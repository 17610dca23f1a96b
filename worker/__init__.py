"""Celery workers that carry out unlearning jobs (see worker/tasks.py and worker/watchdog.py)."""
