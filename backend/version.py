"""Easel's version, written into every infotext."""

VERSION = "0.1.0"
INFOTEXT_VERSION = f"easel-v{VERSION}"
