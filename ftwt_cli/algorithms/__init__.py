"""Algorithms: functions that take models and batches and return results (no configurations, no run
directories): the one-pass estimate and the r search, budget calibration, THE evaluation pass shared by
training, ``ftwt calibrate`` and ``ftwt eval``, input perturbations, and static pruning."""
