"""Image pipeline: URL sources, async fetching, image checks, shard I/O and the download stage."""
