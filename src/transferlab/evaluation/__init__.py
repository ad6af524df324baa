"""Evaluation of trained classifiers: metrics, confidence intervals, calibration, comparisons."""
