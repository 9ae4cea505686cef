"""Workflows: the only code that knows run directories and resolved configurations. Each CLI command
calls one of them: plan (estimate, search), train, calibrate, evaluate."""
