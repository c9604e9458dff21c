"""Optimizers, learning-rate schedules and the Gauss-Newton machinery."""
