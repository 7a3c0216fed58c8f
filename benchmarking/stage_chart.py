"""A horizontal stacked-bar chart of stage times, drawn with OpenCV (no plotting library).

One bar per configuration: its stages' median times laid end to end in pipeline order, in one
colour per stage, the configuration's label on the left, the sum of the medians at the bar's end,
a millisecond axis below and a legend above. A configuration without stage times (skipped) gets
its label and the word "skipped".
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_SCALE = 0.45
TEXT = (40, 40, 40)
MUTED = (150, 150, 150)
BACKGROUND = (255, 255, 255)
#: BGR colours, told apart in print and by the common colour-vision deficiencies (Okabe-Ito).
STAGE_COLOURS = {
    "preprocess": (0, 159, 230),   # orange
    "upload": (233, 180, 86),      # sky blue
    "network": (115, 158, 0),      # bluish green
    "crf": (178, 114, 0),          # blue
    "download": (66, 228, 240),    # yellow
    "postprocess": (167, 121, 204),  # reddish purple
}
OTHER_COLOUR = (120, 120, 120)
BAR_HEIGHT = 26
BAR_GAP = 14
MARGIN = 16


def _text_size(text: str) -> Tuple[int, int]:
    (w, h), baseline = cv2.getTextSize(text, FONT, TEXT_SCALE, 1)
    return w, h + baseline


def _put(img: np.ndarray, text: str, x: int, y: int, colour=TEXT) -> None:
    """Text with its top-left corner at (x, y)."""
    _, h = _text_size(text)
    cv2.putText(img, text, (x, y + h - 3), FONT, TEXT_SCALE, colour, 1, cv2.LINE_AA)


def _fit(text: str, width: int) -> str:
    """text, cut with '...' to fit width pixels (Hershey fonts are ASCII: others become '?')."""
    text = text.encode("ascii", "replace").decode()
    if _text_size(text)[0] <= width:
        return text
    while text and _text_size(text + "...")[0] > width:
        text = text[:-1]
    return text + "..."


def nice_step(span: float, ticks: int = 6) -> float:
    """A tick spacing of 1, 2 or 5 times a power of ten giving about ``ticks`` ticks over span."""
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def stage_chart(bars: Sequence[Tuple[str, Optional[Dict[str, float]]]], width: int = 960,
                title: str = "median time per call (ms), stages stacked") -> np.ndarray:
    """BGR image ``width`` pixels wide: one bar per (label, {stage: median ms} or None = skipped)."""
    stages: List[str] = []
    for _, times in bars:
        for s in times or {}:
            if s not in stages:
                stages.append(s)
    order = [s for s in STAGE_COLOURS if s in stages] + [s for s in stages if s not in STAGE_COLOURS]
    line_h = _text_size("Ag")[1]
    label_w = min(max((_text_size(label)[0] for label, _ in bars), default=0), int(width * 0.4)) + 8
    total_w = max(_text_size("0000.0")[0], 60)
    plot_x0 = MARGIN + label_w
    plot_w = width - plot_x0 - total_w - MARGIN
    if plot_w < 100:
        raise ValueError(f"a chart {width} pixels wide leaves no room for the bars")

    # Legend rows: swatch + name, wrapped at the chart's width.
    legend: List[List[str]] = [[]]
    x = MARGIN
    for s in order:
        item_w = 14 + 6 + _text_size(s)[0] + 18
        if legend[-1] and x + item_w > width - MARGIN:
            legend.append([])
            x = MARGIN
        legend[-1].append(s)
        x += item_w
    top = MARGIN + line_h + 8 + len(legend) * (line_h + 6) + 6
    axis_h = line_h + 14
    height = top + len(bars) * (BAR_HEIGHT + BAR_GAP) + axis_h + MARGIN
    img = np.full((height, width, 3), BACKGROUND, np.uint8)

    _put(img, _fit(title, width - 2 * MARGIN), MARGIN, MARGIN)
    y = MARGIN + line_h + 8
    for row in legend:
        x = MARGIN
        for s in row:
            cv2.rectangle(img, (x, y + 1), (x + 14, y + line_h - 2), STAGE_COLOURS.get(s, OTHER_COLOUR), -1)
            _put(img, s, x + 20, y)
            x += 14 + 6 + _text_size(s)[0] + 18
        y += line_h + 6

    longest = max((sum(t.values()) for _, t in bars if t), default=0.0)
    step = nice_step(longest or 1.0)
    axis_max = step * max(1, math.ceil((longest or 1.0) / step))
    scale = plot_w / axis_max
    bars_bottom = top + len(bars) * (BAR_HEIGHT + BAR_GAP)
    for k in range(int(round(axis_max / step)) + 1):
        tx = plot_x0 + int(round(k * step * scale))
        cv2.line(img, (tx, top - 4), (tx, bars_bottom), (230, 230, 230), 1)
        tick = f"{k * step:g}" + (" ms" if k == int(round(axis_max / step)) else "")
        _put(img, tick, tx - _text_size(f"{k * step:g}")[0] // 2, bars_bottom + 6, MUTED)
    cv2.line(img, (plot_x0, top - 4), (plot_x0, bars_bottom), MUTED, 1)

    for i, (label, times) in enumerate(bars):
        by = top + i * (BAR_HEIGHT + BAR_GAP) + BAR_GAP // 2
        text_y = by + (BAR_HEIGHT - line_h) // 2
        _put(img, _fit(label, label_w - 8), MARGIN, text_y)
        if not times:
            _put(img, "skipped", plot_x0 + 6, text_y, MUTED)
            continue
        end = float(plot_x0)
        for s in order:
            if s not in times:
                continue
            start, end = end, end + times[s] * scale
            if int(round(end)) > int(round(start)):
                cv2.rectangle(img, (int(round(start)), by), (int(round(end)) - 1, by + BAR_HEIGHT),
                              STAGE_COLOURS.get(s, OTHER_COLOUR), -1)
        _put(img, f"{sum(times.values()):.1f}", int(round(end)) + 6, text_y)
    return img


def encode_png(img: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("OpenCV could not encode the chart as PNG")
    return data.tobytes()
