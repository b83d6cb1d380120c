"""Train stage: HDF5 feature dataset, projectors, VLM wrapper, trainer, captioning and metrics."""

RUN_CONFIG = "config.json"  # marks a training run directory (see checkpoints.read_run_config)
RUN_SUMMARY = "summary.json"  # what a run ended with (written at its end, or its stop)
