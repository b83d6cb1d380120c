"""Train stage: HDF5 feature dataset, projectors, VLM wrapper, trainer, captioning and metrics."""
