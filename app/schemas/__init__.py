"""The request and response bodies of the REST API (pydantic v2), one module per resource."""
