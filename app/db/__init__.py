"""Persistence: the SQLAlchemy models, the session and unit of work, and the repositories."""
