"""Labels stage: taxonomy, zero-shot classification over cached CLIP embeddings, label reports."""

# The default taxonomy's category for stand-ins ("image not available" cards): the reports
# show it apart.
PLACEHOLDER_CATEGORY = "image not available"
