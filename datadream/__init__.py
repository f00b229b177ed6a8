"""DataDream: few-shot guided dataset synthesis as a library (no orchestration imports here)."""

__version__ = "0.1.0"
