"""Scoring segmentations against ground truth (instance matching, AP, PQ, ARI)."""
