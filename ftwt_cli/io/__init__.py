"""I/O: profiles and the resolved configuration, data sets, checkpoints, model loading and plots."""
