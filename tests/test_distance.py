"""The fast exact distance transform and the scale estimate's central crop."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from hcsseg.segment.distance import distance_to_background
from hcsseg.segment.scale import ESTIMATE_PIXELS, MIN_PEAKS, estimate_diameter
from tests.test_scale import discs


def test_distance_equals_scipy_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = rng.integers(1, 200, 2)
        mask = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 6)) > rng.uniform(0.3, 0.7)
        if i % 5 == 0:
            mask = mask[::2, ::3]  # not contiguous
        np.testing.assert_array_equal(
            distance_to_background(mask), ndi.distance_transform_edt(mask)
        )
    for mask in (np.ones((7, 9), bool), np.zeros((7, 9), bool)):  # no background / all of it
        np.testing.assert_array_equal(
            distance_to_background(mask), ndi.distance_transform_edt(mask)
        )
    far = np.ones((2600, 3), bool)
    far[0, 0] = False  # distances beyond the exact float32 range are scipy's too
    np.testing.assert_array_equal(distance_to_background(far), ndi.distance_transform_edt(far))


def test_large_fields_are_measured_on_their_centre_unless_it_is_empty() -> None:
    side = int(np.sqrt(2 * ESTIMATE_PIXELS)) + 8  # just above the crop threshold
    image, _ = discs((side, side), 16.0)
    full = estimate_diameter(image.astype(np.float32)[:1400, :1400])  # below the threshold
    cropped = estimate_diameter(image)
    assert full is not None and cropped is not None
    # calibrated to real nuclei, perfect discs read up to ~20 % large (test_scale.py)
    assert abs(cropped / 16.0 - 1) < 0.3 and abs(cropped - full) / full < 0.05
    # objects only near the edges: the centre crop holds fewer than MIN_PEAKS, so the
    # whole field is measured and still finds them
    edges = image.copy()
    edges[200:-200, 200:-200] = edges[:10, :10].mean()
    assert MIN_PEAKS > 0
    found = estimate_diameter(edges)
    assert found is not None and abs(found / 16.0 - 1) < 0.3
