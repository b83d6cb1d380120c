"""Encode stage: open_clip loading, patch-token features, placeholder filter, HDF5 shards."""
