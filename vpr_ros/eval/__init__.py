"""Evaluation: recall and precision metrics, offline evaluation under links, loop-closure scoring, plots."""
