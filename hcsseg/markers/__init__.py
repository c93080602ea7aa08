"""Nucleus markers: detection on real or virtual nucleus images, and their QC."""
