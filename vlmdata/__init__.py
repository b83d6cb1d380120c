"""vlmdata: web-scale image-text URL lists to an offline CLIP embedding cache and VLM adapters."""

__version__ = "0.1.0"
