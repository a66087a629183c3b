"""Pictures an inspector reads at a glance: the part stays visible under the heat, the verdict is
in words in a banner that always fits, and a part flagged by its image term says so."""

from __future__ import annotations

import numpy as np
import pytest

from stpm import visualize
from stpm.scoring import Prediction


def prediction(width: int, anomalous: bool = True, by_term: bool = False) -> Prediction:
    anomaly_map = np.zeros((80, width), np.float32)
    if anomalous and not by_term:
        anomaly_map[20:40, width // 3 : width // 2] = 0.6
    return Prediction(
        path=None,
        score=0.5 if anomalous else 0.1,
        normalized_score=0.73 if anomalous else 0.12,
        anomaly_map=anomaly_map,
        mask=anomaly_map > 0.3,
        is_anomalous=anomalous,
        threshold=0.3,
        image_term=0.45 if by_term else 0.0,
    )


@pytest.mark.parametrize("width", [64, 113, 2000])
@pytest.mark.parametrize(("anomalous", "by_term"), [(True, False), (True, True), (False, False)])
def test_the_label_fits_inside_the_image(width, anomalous, by_term):
    case = prediction(width, anomalous, by_term)
    scale, lines = visualize.banner_text(case, width)
    margin = max(2, round(4 * scale))
    for line in lines:
        assert visualize._text_width(line, scale) <= width - 2 * margin, (width, line)
    word = "ANOMALOUS" if anomalous else "good"
    verdict = lines[0].split(" ")[0]
    assert verdict in (word, "ANOM"), lines  # the verdict in words, never in colour alone
    if width >= 113:
        assert lines[0] == f"{word} {case.normalized_score:.2f}"
    image = np.full((80, width, 3), 120, np.uint8)
    drawn = visualize.overlay(image, case)
    assert drawn.shape[1] == width and drawn.shape[0] > 80


def test_a_part_flagged_by_its_term_alone_says_so():
    flagged = prediction(400, by_term=True)
    assert flagged.flagged_by_term and not flagged.mask.any()
    assert not prediction(400).flagged_by_term and not prediction(400, False).flagged_by_term
    _, lines = visualize.banner_text(flagged, 400)
    assert "flagged as a whole: no pixel above the threshold" in " ".join(lines)
    _, narrow = visualize.banner_text(flagged, 64)
    assert "whole" in " ".join(narrow)


def test_heat_is_transparent_below_the_floor_and_present_above_it():
    image = np.full((60, 90, 3), 128, np.uint8)
    image[:, :, 2] = 40  # a colour part: its colours stay where the map is low
    anomaly_map = np.zeros((60, 90), np.float32)
    anomaly_map[5:20, 5:20] = 0.49 * 0.3  # under the floor (half the threshold)
    anomaly_map[35:55, 50:80] = 1.5 * 0.3  # above the threshold
    drawn = visualize.heat_overlay(image, anomaly_map, 0.3)
    assert np.array_equal(drawn[:30, :40], image[:30, :40])  # the part as it is
    assert np.abs(drawn[40:50, 60:70].astype(int) - image[40:50, 60:70]).max() > 40  # heat
    red, green, blue = (drawn[..., channel].astype(int) for channel in range(3))
    outline = (green > 180) & (blue > 180) & (red < 120)  # cyan: the mask's outline
    assert outline[30:60, 45:85].any() and not outline[:30].any()  # around the mask only
