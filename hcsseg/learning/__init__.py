"""The learning kit shared by `hcsseg.segment` and `hcsseg.virtual_stain`."""
