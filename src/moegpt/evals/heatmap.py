"""A passkey accuracy heatmap as a PNG (Pillow): lengths down, depths across, each cell
coloured from red (0%) to green (100%) and labelled with its accuracy."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from moegpt.evals.passkey import PasskeyResult
from moegpt.fileio import write_atomically

CELL, MARGIN_LEFT, MARGIN_TOP = 56, 72, 40


def _colour(accuracy: float) -> tuple[int, int, int]:
    return round(220 * (1 - accuracy)), round(180 * accuracy), 60


def save_heatmap(result: PasskeyResult, path: Path, title: str) -> None:
    """Write the heatmap to ``path`` (whole or not at all)."""
    rows, columns = len(result.lengths), len(result.depths)
    size = (MARGIN_LEFT + columns * CELL + 8, MARGIN_TOP + rows * CELL + 28)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((8, 8), title, fill="black", font=font)
    for i, length in enumerate(result.lengths):
        y = MARGIN_TOP + i * CELL
        draw.text((8, y + CELL // 2 - 6), str(length), fill="black", font=font)
        for j in range(columns):
            x = MARGIN_LEFT + j * CELL
            accuracy = result.accuracy(i, j)
            draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=_colour(accuracy))
            draw.text((x + 12, y + CELL // 2 - 6), f"{accuracy:.0%}", fill="white", font=font)
    bottom = MARGIN_TOP + rows * CELL + 6
    for j, depth in enumerate(result.depths):
        draw.text((MARGIN_LEFT + j * CELL + 12, bottom), f"{depth:.0%}", fill="black", font=font)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    write_atomically(path, encoded.getvalue())
