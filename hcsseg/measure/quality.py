"""Image-quality metrics after CellProfiler's MeasureImageQuality.

Names match CellProfiler so QC columns line up with existing screens:
``Image_ImageQuality_<Feature>_<Channel>``. Intensities are scaled like CellProfiler
(integer images divided by their dtype's maximum).
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from hcsseg.errors import InputDataError

FOCUS_WINDOW = 20  # CellProfiler's default local-focus window, in pixels
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


def _scaled(image: np.ndarray) -> np.ndarray:
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float64)


def focus_score(image: np.ndarray) -> float:
    """Normalised variance (Groen et al. 1985), CellProfiler's FocusScore: var / mean."""
    mean = float(image.mean())
    if mean <= 0 or image.max() == image.min():
        return 0.0
    return float(image.var() / mean)


def local_focus_score(image: np.ndarray, window: int = FOCUS_WINDOW) -> float:
    """Mean normalised variance over non-overlapping windows (CellProfiler LocalFocusScore)."""
    h, w = (image.shape[0] // window) * window, (image.shape[1] // window) * window
    if h == 0 or w == 0:
        return focus_score(image)
    tiles = image[:h, :w].reshape(h // window, window, w // window, window)
    means = tiles.mean(axis=(1, 3))
    var = tiles.var(axis=(1, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(means > 0, var / means, 0.0)
    return float(scores.mean())


def power_log_log_slope(image: np.ndarray) -> float:
    """Slope of log radial power spectrum vs log frequency; blur makes it more negative.

    CellProfiler fits the radially summed power spectrum of the mean-subtracted image,
    skipping the DC term; a constant image has no spectrum and gives NaN.
    """
    if image.max() == image.min():
        return float("nan")
    img = image - image.mean()
    n = min(image.shape)
    img = img[:n, :n]
    power = np.abs(np.fft.fftshift(np.fft.fft2(img))) ** 2
    cy, cx = n // 2, n // 2
    yy, xx = np.indices(power.shape)
    radius = np.hypot(yy - cy, xx - cx).astype(int)
    radial = np.bincount(radius.ravel(), weights=power.ravel())
    freqs = np.arange(1, min(n // 2, radial.size))
    values = radial[freqs]
    ok = values > 0
    if ok.sum() < 2:
        return float("nan")
    slope, _ = np.polyfit(np.log(freqs[ok]), np.log(values[ok]), 1)
    return float(slope)


def image_quality(image: np.ndarray, *, saturation_value: float | None = None) -> dict[str, float]:
    """QC metrics of one 2-D channel; keys are CellProfiler feature names (no prefix)."""
    if image.ndim != 2 or image.size == 0:
        raise InputDataError(f"image quality needs a non-empty 2-D image, got {image.shape}")
    raw = np.asarray(image)
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise InputDataError("image has NaN or infinite pixels")
    scaled = _scaled(raw)
    if saturation_value is None:
        top = scaled.max()
    elif np.issubdtype(raw.dtype, np.integer):
        top = saturation_value / float(np.iinfo(raw.dtype).max)
    else:
        top = saturation_value
    lo = scaled.min()
    constant = bool(scaled.max() == lo)
    otsu = float(lo) if constant else float(threshold_otsu(scaled))
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
        # Background: mean of pixels at or below the Otsu threshold (the dark phase).
        "BackgroundLevel": float(background.mean()) if background.size else float(lo),
    }


def quality_columns(metrics: dict[str, float], channel_token: str) -> dict[str, float]:
    """``{"FocusScore": x}`` -> ``{"Image_ImageQuality_FocusScore_<Ch>": x}``."""
    return {f"Image_ImageQuality_{k}_{channel_token}": v for k, v in metrics.items()}
