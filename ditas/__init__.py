"""What the root scripts share: flags and their checks (cli), the sampling pipeline, the shard store,
CPU threads. Not installed by `pip install .`: it imports the root modules (models, config, download)."""
