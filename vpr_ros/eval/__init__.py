"""Evaluation: recall and precision metrics, offline evaluation under links, loop-closure evaluation,
replay scoring, plots."""
