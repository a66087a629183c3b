"""Pictures people would rather look at than read: loss curves, heatmap overlays.

An overlay leaves the part as it is wherever the map is low, so an operator still sees the
surface; heat starts at half the threshold and is strongest from the threshold up, the pixels
above the threshold are outlined, and a banner above the image says the verdict in words, with a
colour scale whose tick is the threshold. Colours chosen by looking at Magnetic Tile (grey) and a
colour tissue stain (docs/overlays_before_after.png, scripts/overlay_figure.py): inferno is
perceptually ordered and reads for colour-blind eyes, and its colours are rare on metal; the
cyan outline is a hue inferno never takes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .files import atomic_write
from .scoring import Prediction

FLOOR = 0.5  # heat starts at this share of the threshold: below it the part is left as it is
TOP = 2.0  # the colour scale ends at twice the threshold
OPACITY = 0.65  # the heat's opacity at and above the threshold
COLORMAP = cv2.COLORMAP_INFERNO
OUTLINE = (0, 255, 255)  # cyan, RGB
ALARM, CALM, TEXT = (150, 20, 20), (45, 45, 45), (255, 255, 255)  # banner colours, RGB
FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_FONT = 0.35  # the smallest font scale tried before shorter wordings

# Figures are drawn on Figure objects of their own, never through pyplot: the caller's matplotlib
# backend (a notebook's, a GUI's) is left as it was, and no screen is needed. matplotlib is
# imported by the functions that draw figures: overlays and masks need only OpenCV.
PNG_PICTURE = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
PNG_MASK = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_BILEVEL, 1]


def plot_loss_curve(history: list[dict], path: str | Path, best_epoch: int | None = None) -> Path:
    """Training (and validation) loss per epoch, the kept epoch marked; written as PNG."""
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.subplots()
    axis.plot(epochs, [record["loss"] for record in history], marker="o", label="training loss")
    if history and "validation_loss" in history[0]:
        validation = [record["validation_loss"] for record in history]
        axis.plot(epochs, validation, marker="s", label="validation loss (held-out good)")
    if best_epoch:
        axis.axvline(best_epoch, color="grey", linestyle="--", label=f"kept epoch {best_epoch}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (sum over levels of mean 1 - cosine)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """RGB uint8 (H, W, 3): the image, its own grey levels or colours wherever the map stays
    under FLOOR x threshold; above, heat (COLORMAP from FLOOR to TOP x threshold) ever more
    opaque up to OPACITY at the threshold; and the outline of the pixels above the threshold
    (the mask) in OUTLINE. anomaly_map: float (H, W) at the image's size."""
    reference = threshold if threshold > 0 else max(float(anomaly_map.max()), 1e-12)
    low = FLOOR * reference
    shown = image.copy()
    hot = anomaly_map > low  # only these pixels change: a good part costs a copy
    if hot.any():
        values = anomaly_map[hot]
        level = np.clip((values - low) / ((TOP - FLOOR) * reference), 0.0, 1.0)
        alpha = (np.minimum((values - low) / (reference - low), 1.0) * OPACITY)[:, None]
        colours = cv2.applyColorMap((level * 255).astype(np.uint8)[:, None], COLORMAP)[:, 0, ::-1]
        shown[hot] = (image[hot] * (1.0 - alpha) + colours * alpha + 0.5).astype(np.uint8)
    outline, _ = cv2.findContours(
        (anomaly_map > threshold).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    thickness = max(1, round(min(image.shape[:2]) / 150))
    cv2.drawContours(shown, outline, -1, OUTLINE, thickness, cv2.LINE_AA)
    return shown


def overlay(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    """What stpm-predict draws for a part: a banner with the verdict in words and the colour
    scale, over the image with its heat (heat_overlay). RGB uint8 (banner + H, W, 3)."""
    shown = heat_overlay(image, prediction.anomaly_map, prediction.threshold)
    return np.vstack([banner(prediction, image.shape[1]), shown])


def verdict_lines(prediction: Prediction) -> list[list[str]]:
    """What the banner says, from the fullest to the shortest wording: each a list of lines.
    The verdict is always in words (not in colour alone), and a part that only its image term
    flags says so (the page of a later front end shows the same lines)."""
    anomalous, normalized = prediction.is_anomalous, f"{prediction.normalized_score:.2f}"
    word, short = ("ANOMALOUS", "ANOM") if anomalous else ("good", "good")
    numbers = f"score {prediction.score:.3g}, threshold {prediction.threshold:.3g}"
    whole = prediction.flagged_by_term
    full = [f"{word} {normalized}", numbers]
    shorter = [f"{word} {normalized}"]
    if whole:  # the image-level term: the part as a whole, no single pixel
        full.append("flagged as a whole: no pixel above the threshold")
        shorter.append("flagged as a whole")
    shortest = [f"{short} {normalized}"] + (["as a whole"] if whole else [])
    return [full, shorter, shortest, [short[0].upper()]]


def banner(prediction: Prediction, width: int) -> np.ndarray:
    """RGB uint8 (h, width, 3): the verdict in words, sized to the width and wrapped or
    abbreviated so that it always fits, over the colour scale with the threshold marked."""
    scale, lines = banner_text(prediction, width)
    (_, text_height), baseline = cv2.getTextSize("Ag", FONT, scale, 1)
    pad = _margin(scale)
    line_height = text_height + baseline + pad
    strip = max(4, round(line_height / 3))
    height = 2 * pad + len(lines) * line_height + strip
    shown = np.empty((height, width, 3), np.uint8)
    shown[:] = ALARM if prediction.is_anomalous else CALM
    for number, line in enumerate(lines, 1):
        origin = (pad, pad + number * line_height - baseline - max(1, round(2 * scale)))
        cv2.putText(shown, line, origin, FONT, scale, TEXT, _stroke(scale), cv2.LINE_AA)
    _colour_scale(shown[height - pad - strip : height - pad, pad : width - pad])
    return shown


def banner_text(prediction: Prediction, width: int) -> tuple[float, list[str]]:
    """(font scale, lines) of a banner width pixels wide: the fullest wording (verdict_lines)
    whose every line fits as it is, at a scale sized to the width; failing that, the shortest
    wrapped at spaces; failing that, a smaller scale; at last one letter. Every line fits
    inside the margins."""
    *wordings, letter = verdict_lines(prediction)
    scale = float(np.clip(width / 700, MIN_FONT, 1.6))
    while True:
        room = width - 2 * _margin(scale)
        for wording in wordings:
            if all(_text_width(line, scale) <= room for line in wording):
                return scale, wording
        lines = _wrapped(wordings[-1], scale, room)
        if lines is not None:
            return scale, lines
        if scale <= 0.2:
            return scale, letter  # A or G at the smallest scale: a sliver of an image
        scale *= 0.85


def _margin(scale: float) -> int:
    return max(2, round(4 * scale))


def _wrapped(wording: list[str], scale: float, room: int) -> list[str] | None:
    """The lines wrapped at spaces to fit room pixels, or None where one word is too wide."""
    lines = []
    for text in wording:
        line = ""
        for word in text.split(" "):
            if _text_width(word, scale) > room:
                return None
            candidate = f"{line} {word}" if line else word
            if _text_width(candidate, scale) <= room:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, _stroke(scale))[0][0]


def _stroke(scale: float) -> int:
    return max(1, round(scale * 1.5))


def _colour_scale(strip: np.ndarray) -> None:
    """The heat's colours from FLOOR to TOP x the threshold along strip, in place, and a tick
    at the threshold."""
    if strip.size == 0:
        return
    width = strip.shape[1]
    levels = np.linspace(0, 255, width).astype(np.uint8)[None]
    strip[:] = cv2.applyColorMap(levels, COLORMAP)[..., ::-1]
    tick = round((1 - FLOOR) / (TOP - FLOOR) * (width - 1))
    strip[:, max(0, tick - 1) : tick + 1] = TEXT


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB (H, W, 3) or single-channel (H, W) uint8 image as PNG, atomically."""
    encoded = encode_png(image)
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(encoded))


def encode_png(image: np.ndarray) -> bytes:
    """An RGB (H, W, 3) or single-channel (H, W) uint8 image as PNG bytes (what write_png writes).

    Stored, not compressed (PNG_PICTURE): an overlay per part must keep up with the scoring. On
    the benchmark's CPU a 373 x 248 overlay took 0.5 ms so, 5.7 ms at zlib's fastest level and
    2.7 ms with Huffman coding alone, for files 2.3 and 1.9 times smaller.
    """
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return _encoded(image, PNG_PICTURE)


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a bool (H, W) mask as a 1-bit PNG, atomically: black, and white where True (read
    back as 0 and 255 by OpenCV); a few kilobytes, in a third of a millisecond."""
    encoded = _encoded(mask.astype(np.uint8) * 255, PNG_MASK)
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(encoded))


def _encoded(image: np.ndarray, options: list[int]) -> bytes:
    ok, encoded = cv2.imencode(".png", image, options)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return encoded.tobytes()


def comparison_grid(
    columns: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str | Path
) -> Path:
    """One column per image, titled: the image, its ground-truth mask and its heat, one above
    the other; each column as wide as its image's shape asks at a common height, so no cell is
    left mostly empty and a test set's examples read on one screen. PNG."""
    from matplotlib.figure import Figure

    aspects = [image.shape[1] / image.shape[0] for _, image, _, _ in columns]
    panel, title = 1.9, 0.75  # inches: a panel's height, the titles above the columns
    width = panel * sum(aspects) + 0.04 * len(columns) + 0.6
    figure = Figure(figsize=(width, 3 * panel + title), dpi=100)
    grid = figure.add_gridspec(3, len(columns), width_ratios=aspects, wspace=0.04, hspace=0.03)
    for place, (label, image, mask, heat) in enumerate(columns):
        for row, picture in enumerate((image, mask, heat)):
            axis = figure.add_subplot(grid[row, place])
            axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(label, fontsize=5.5)
            if place == 0:
                axis.set_ylabel(("image", "ground truth", "heat")[row], fontsize=8)
    figure.subplots_adjust(
        left=0.6 / width, right=0.995, bottom=0.005, top=1 - title / (3 * panel + title)
    )
    return _save(figure, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path) -> Path:
    """ROC curves, one per name: (false-positive rate, true-positive rate, AUROC)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100)
    axis = figure.subplots()
    for name, (fpr, tpr, area) in curves.items():
        axis.plot(fpr, tpr, label=f"{name} (AUROC {area:.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("false-positive rate")
    axis.set_ylabel("true-positive rate")
    if curves:
        axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def score_histogram(
    good: np.ndarray,
    defective: np.ndarray,
    threshold: float | None,
    path: str | Path,
    score: str = "image score (the map's maximum)",
) -> Path:
    """Image scores of good and defective test images, with the model's threshold; score names
    the score as the model computes it (the x axis)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.subplots()
    bins = np.histogram_bin_edges(np.r_[good, defective], bins=40)
    axis.hist(good, bins=bins, alpha=0.6, label=f"good ({len(good)})", color="tab:blue")
    axis.hist(
        defective, bins=bins, alpha=0.6, label=f"defective ({len(defective)})", color="tab:red"
    )
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    axis.set_xlabel(score)
    axis.set_ylabel("images")
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    return Path(path)
