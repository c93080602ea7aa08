"""User-facing errors: each names the plate, well, field or channel at fault.

Library code raises these instead of letting a zarr/numpy/torch traceback reach the
user; the CLI prints them as one line and exits non-zero.
"""

from __future__ import annotations


class HcssegError(Exception):
    """Base class for errors a user can act on."""


class PlateFormatError(HcssegError):
    """The store is not an OME-Zarr HCS plate (or a well/field in it is malformed)."""


class ChannelNotFoundError(HcssegError):
    """A channel name asked for is not in the plate's `omero.channels`."""

    def __init__(self, missing: str | list[str], available: list[str], where: str = "plate"):
        missing_list = [missing] if isinstance(missing, str) else list(missing)
        self.missing = missing_list
        self.available = list(available)
        super().__init__(
            f"channel(s) {', '.join(repr(m) for m in missing_list)} not found in {where}; "
            f"available channels: {', '.join(repr(a) for a in available) or '(none)'}"
        )


class InputDataError(HcssegError):
    """Pixel data or annotations that cannot be processed (NaNs, wrong dtype, overlaps...)."""


class ModelError(HcssegError):
    """A model file or model card that cannot be used for this plate."""


class ImportPatternError(HcssegError):
    """A TIFF import pattern that matches nothing or lacks a required group."""
