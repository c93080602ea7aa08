"""Segmentation of nuclei and cells from pixel arrays."""
