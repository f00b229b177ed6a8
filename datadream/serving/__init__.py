"""Serving: the MLflow pyfunc model that wraps a classify output folder (logged from code)."""
