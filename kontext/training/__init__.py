"""Training infrastructure: the config schema, the output folder, checkpoints, signals, validation, the run summary."""
