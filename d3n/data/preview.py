"""A mosaic of a dataset's first images with their boxes drawn, for eyeballing labels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from d3n.data.layout import DatasetLayout

# One distinct colour per class index (cycled past the palette's end).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230))


def save_preview(data: str | Path, out: str | Path, n: int = 16, tile: int = 256) -> Path:
    """Write a sqrt(n) x sqrt(n) mosaic of the first images (train, then val) with labelled boxes."""
    from d3n.artifacts import save_with

    layout = DatasetLayout.open(data)
    images = [p for split in layout.splits for p in layout.images(split)][:n]
    cols = max(1, int(round(len(images) ** 0.5)))
    rows = max(1, -(-len(images) // cols))
    mosaic = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))
    draw = ImageDraw.Draw(mosaic)
    for k, path in enumerate(images):
        ox, oy = (k % cols) * tile, (k // cols) * tile
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # labels are on the turned image, as the stages read it
            mosaic.paste(im.convert("RGB").resize((tile, tile), Image.BILINEAR), (ox, oy))
        for cls, cx, cy, w, h in layout.labels(path):
            color = PALETTE[int(cls) % len(PALETTE)]
            x0, y0 = ox + (cx - w / 2) * tile, oy + (cy - h / 2) * tile
            x1, y1 = ox + (cx + w / 2) * tile, oy + (cy + h / 2) * tile
            draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
            name = layout.names[int(cls)] if int(cls) < layout.nc else str(int(cls))
            draw.text((x0 + 2, max(oy, y0 - 11)), name, fill=color)
    return save_with(out, lambda p: mosaic.save(p, "PNG"))
