"""Image-quality metrics after CellProfiler's MeasureImageQuality.

Names match CellProfiler so QC columns line up with existing screens:
``Image_ImageQuality_<Feature>_<Channel>``.  Intensities are scaled like CellProfiler
(integer images divided by their dtype's maximum, floats as they are), so FocusScore,
which is not scale-free, is comparable with CellProfiler's.

Undefined values: a constant image has FocusScore and LocalFocusScore 0 (as CellProfiler)
but PowerLogLogSlope NaN, where CellProfiler writes 0; a flat spectrum slope of 0 would read
as a perfectly sharp field, NaN tells QC rules the slope could not be measured.  The slope is
also NaN for images under 24 pixels on a side, which leave fewer than two frequencies.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from hcsseg.errors import InputDataError

FOCUS_WINDOW = 20  # CellProfiler's default spatial scale for LocalFocusScore, in pixels
QUALITY_FEATURES = (
    "FocusScore",
    "LocalFocusScore",
    "PowerLogLogSlope",
    "PercentMaximal",
    "PercentMinimal",
    "MeanIntensity",
    "MedianIntensity",
    "StdIntensity",
    "MADIntensity",
    "ThresholdOtsu",
    "BackgroundLevel",
)


def focus_score(image: np.ndarray) -> float:
    """Normalised variance (Groen et al. 1985), CellProfiler's FocusScore: var / mean."""
    mean = float(image.mean())
    if mean <= 0 or image.max() == image.min():  # exact 0, not rounding noise, when flat
        return 0.0
    return float(image.var() / mean)


def local_focus_score(image: np.ndarray, window: int = FOCUS_WINDOW) -> float:
    """CellProfiler's LocalFocusScore: spread of the normalised variance across tiles.

    The image is cut into ceil(H / window) x ceil(W / window) equal tiles; each tile with a
    non-zero mean gets var / mean, and the score is var(those) / median(those).  A field that
    is sharp in one part and blurred or empty in another scores high.
    """
    h, w = image.shape
    if image.max() == image.min():
        return 0.0
    rows = (np.arange(h) * -(-h // window)) // h
    cols = (np.arange(w) * -(-w // window)) // w
    tiles = (rows[:, None] * (cols.max() + 1) + cols[None, :]).ravel()
    values = image.ravel()
    count = np.bincount(tiles)
    mean = np.bincount(tiles, weights=values) / count
    var = np.bincount(tiles, weights=(values - mean[tiles]) ** 2) / count
    usable = mean != 0
    if not usable.any():
        return 0.0
    normalised = var[usable] / mean[usable]
    median = float(np.median(normalised))
    return float(np.var(normalised) / median) if median > 0 else 0.0


def power_log_log_slope(image: np.ndarray) -> float:
    """CellProfiler's PowerLogLogSlope: log-log slope of the radial power spectrum.

    As CellProfiler (centrosome's ``rps``): power of the mean-subtracted image summed over
    rings of integer radius 2 .. min(H, W) / 8 (low frequencies only, away from edge effects),
    fitted by least squares in log-log.  Blur removes high frequencies, so a blurred field has
    a more negative slope.  NaN for a constant image or fewer than two usable radii.
    """
    h, w = image.shape
    if image.max() == image.min():
        return float("nan")
    radii2 = (np.arange(h)[:, None] ** 2) + (np.arange(w)[None, :] ** 2)
    radii2 = np.minimum(radii2, np.flipud(radii2))
    radii2 = np.minimum(radii2, np.fliplr(radii2))
    radius = np.floor(np.sqrt(radii2)).astype(np.int64) + 1
    rings = np.arange(2, int(np.floor(min(h, w) / 8.0)))
    if rings.size < 2:
        return float("nan")
    spread = float(np.median(np.abs(image - image.mean())))
    scaled = image / spread if spread > 0 else image  # intensity invariance, as CellProfiler
    power = np.abs(np.fft.fft2(scaled - scaled.mean())) ** 2
    ring_power = np.asarray(ndi.sum(power, radius, rings))
    usable = ring_power > 0
    if usable.sum() < 2:
        return float("nan")
    slope, _ = np.polyfit(np.log(rings[usable]), np.log(ring_power[usable]), 1)
    return float(slope)


def image_quality(image: np.ndarray, *, saturation_value: float | None = None) -> dict[str, float]:
    """QC metrics of one 2-D channel; keys are CellProfiler feature names (no prefix).

    PercentMaximal is the percentage of pixels at the image's maximum (CellProfiler) or, when
    `saturation_value` is given in raw pixel units (e.g. 4095 for a 12-bit camera), at or
    above it (0 for an all-black image).  BackgroundLevel is the mean of the pixels at or below
    the Otsu threshold.
    """
    raw = np.asarray(image)
    if raw.ndim != 2 or raw.size == 0:
        raise InputDataError(f"image quality needs a non-empty 2-D image, got {raw.shape}")
    if raw.dtype.kind not in "biuf":
        raise InputDataError(f"image quality needs numeric pixels, got dtype {raw.dtype}")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise InputDataError("image has NaN or infinite pixels")
    scale = 1.0 / float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "iu" else 1.0
    scaled = raw.astype(np.float64) * scale
    lo, hi = float(scaled.min()), float(scaled.max())
    top = hi if saturation_value is None else saturation_value * scale
    otsu = lo if hi == lo else float(threshold_otsu(scaled))
    background = scaled[scaled <= otsu]
    median = float(np.median(scaled))
    return {
        "FocusScore": focus_score(scaled),
        "LocalFocusScore": local_focus_score(scaled),
        "PowerLogLogSlope": power_log_log_slope(scaled),
        "PercentMaximal": float(100.0 * np.mean(scaled >= top)) if top > 0 else 0.0,
        "PercentMinimal": float(100.0 * np.mean(scaled <= lo)),
        "MeanIntensity": float(scaled.mean()),
        "MedianIntensity": median,
        "StdIntensity": float(scaled.std()),
        "MADIntensity": float(np.median(np.abs(scaled - median))),
        "ThresholdOtsu": otsu,
        "BackgroundLevel": float(background.mean()),
    }


def quality_columns(metrics: dict[str, float], channel_token: str) -> dict[str, float]:
    """``{"FocusScore": x}`` -> ``{"Image_ImageQuality_FocusScore_<Ch>": x}``."""
    return {f"Image_ImageQuality_{k}_{channel_token}": v for k, v in metrics.items()}
