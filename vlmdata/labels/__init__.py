"""Labels stage: taxonomy, zero-shot classification over cached CLIP embeddings, label reports."""
