"""image_quality: CellProfiler definitions on images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError
from hcsseg.measure.quality import (
    QUALITY_FEATURES,
    image_quality,
    local_focus_score,
    power_log_log_slope,
    quality_columns,
)
from tests.conftest import dataset


def _power_law_noise(n: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Random image whose power spectrum falls as 1 / f**alpha."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) * f ** (-alpha / 2)
    return np.real(np.fft.ifft2(spectrum))


@pytest.mark.parametrize("alpha", [2.0, 3.0])
def test_power_slope_recovers_spectrum_exponent(alpha: float) -> None:
    # Power summed over rings of width 1 (ring length ∝ r): slope = 1 - alpha.
    slope = power_log_log_slope(_power_law_noise(512, alpha))
    assert slope == pytest.approx(1 - alpha, abs=0.15)


def test_blur_lowers_focus_and_steepens_slope() -> None:
    rng = np.random.default_rng(0)
    sharp = ndi.gaussian_filter((rng.random((256, 256)) > 0.95) * 200.0, 1.0) + 20
    blurred = ndi.gaussian_filter(sharp, 3)
    q_sharp, q_blur = image_quality(sharp), image_quality(blurred)
    assert q_blur["FocusScore"] < 0.5 * q_sharp["FocusScore"]
    assert q_blur["PowerLogLogSlope"] < q_sharp["PowerLogLogSlope"] - 1


def test_focus_scores_match_their_definitions() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 50)).astype(np.uint8)
    scaled = image / 255.0
    q = image_quality(image)
    assert q["FocusScore"] == pytest.approx(scaled.var() / scaled.mean())
    # LocalFocusScore reference: 3 x 3 tiles for window 20 on 60 x 50, by explicit loops
    rows = np.array_split(np.arange(60), 3)
    cols = [np.arange(0, 17), np.arange(17, 34), np.arange(34, 50)]  # floor(j * 3 / 50)
    normvar = np.array(
        [scaled[np.ix_(r, c)].var() / scaled[np.ix_(r, c)].mean() for r in rows for c in cols]
    )
    assert q["LocalFocusScore"] == pytest.approx(normvar.var() / np.median(normvar))


def test_local_focus_flags_a_half_blurred_field() -> None:
    rng = np.random.default_rng(2)
    uniform = rng.random((200, 200)) + 1
    half = uniform.copy()
    half[:, 100:] = ndi.gaussian_filter(half, 4)[:, 100:]
    assert local_focus_score(half) > 5 * local_focus_score(uniform)


def test_saturation_and_intensity_statistics() -> None:
    image = np.zeros((10, 10), np.uint16)
    image[:2] = 4095  # 12-bit camera saturation
    image[2:5] = 1000
    q = image_quality(image, saturation_value=4095)
    assert q["PercentMaximal"] == pytest.approx(20.0)
    assert q["PercentMinimal"] == pytest.approx(50.0)
    assert q["MedianIntensity"] == pytest.approx(500 / 65535)
    assert q["MeanIntensity"] == pytest.approx((20 * 4095 + 30 * 1000) / 100 / 65535)
    assert q["MADIntensity"] == pytest.approx(500 / 65535)
    # without a saturation value: pixels at the image maximum, as CellProfiler
    assert image_quality(image)["PercentMaximal"] == pytest.approx(20.0)
    assert image_quality(image, saturation_value=65535)["PercentMaximal"] == 0.0


def test_threshold_and_background_of_a_bimodal_field() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(100, 5, (64, 64)).astype(np.uint16)
    cells = np.zeros(image.shape, bool)
    cells[10:30, 10:30] = True
    image[cells] = rng.normal(3000, 50, cells.sum()).astype(np.uint16)
    q = image_quality(image)
    # any threshold in the gap between the two modes separates them
    assert image[~cells].max() / 65535 <= q["ThresholdOtsu"] < image[cells].min() / 65535
    assert q["BackgroundLevel"] == pytest.approx(100 / 65535, rel=0.02)


def test_constant_and_tiny_images() -> None:
    flat = image_quality(np.full((64, 64), 300, np.uint16))
    assert set(flat) == set(QUALITY_FEATURES)
    assert flat["FocusScore"] == 0 and flat["LocalFocusScore"] == 0
    assert np.isnan(flat["PowerLogLogSlope"])
    assert all(np.isfinite(v) for k, v in flat.items() if k != "PowerLogLogSlope")
    tiny = image_quality(np.arange(100, dtype=np.float64).reshape(10, 10))
    assert np.isnan(tiny["PowerLogLogSlope"]) and tiny["FocusScore"] > 0


def test_bad_input_and_column_names() -> None:
    for bad in (np.full((8, 8), np.inf), np.zeros((0, 8)), np.zeros((2, 8, 8))):
        with pytest.raises(InputDataError):
            image_quality(bad)
    with pytest.raises(InputDataError, match="numeric"):
        image_quality(np.full((8, 8), "a"))
    cols = quality_columns({"FocusScore": 1.0, "PercentMaximal": 2.0}, "DNA")
    assert cols == {
        "Image_ImageQuality_FocusScore_DNA": 1.0,
        "Image_ImageQuality_PercentMaximal_DNA": 2.0,
    }


def test_real_field_blur(shared_data) -> None:
    root = dataset(shared_data, "cellprofiler-human")
    dna = tifffile.imread(next(root.glob("*d0.tif")))
    blurred = ndi.gaussian_filter(dna.astype(np.float32), 2).astype(np.uint8)
    q, qb = image_quality(dna), image_quality(blurred)
    assert qb["FocusScore"] < q["FocusScore"]
    assert qb["PowerLogLogSlope"] < q["PowerLogLogSlope"]
