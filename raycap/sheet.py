"""A side-by-side sheet of several models' captions on the same images, one HTML page and one PNG.

Each row holds an image, its reference captions and every model's caption with its per-image
BLEU-4 and CIDEr-D (`raycap.metrics.per_image_scores`); rows where the models disagree most come
first: most distinct captions, then the widest spread of CIDEr-D. The HTML page embeds its images
(it opens from anywhere, S3 included) and holds every row; the PNG shows the first PNG_ROWS.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMB = 128  # pixels per image in the sheet
PNG_ROWS = 12  # rows drawn in the PNG; the HTML page holds all
MAX_REFERENCES = 3  # references shown per image in the PNG


@dataclass(frozen=True)
class Row:
    image_id: int
    image: np.ndarray  # (S, S, 3) uint8
    references: list[str]
    captions: dict[str, tuple[str, dict[str, float]]]  # model -> (caption, {"bleu4", "cider_d"})

    def disagreement(self) -> tuple[int, float]:
        """(distinct captions, CIDEr-D spread across models): larger disagrees more."""
        cider = [scores["cider_d"] for _, scores in self.captions.values()]
        return len({caption for caption, _ in self.captions.values()}), max(cider) - min(cider)


def sheet_rows(
    images: Mapping[int, np.ndarray],
    references: Mapping[int, Sequence[str]],
    captions: Mapping[str, Mapping[int, str]],
    scores: Mapping[str, Mapping[int, dict[str, float]]],
) -> list[Row]:
    """One row per image of `images`, the models (keys of `captions` and `scores`) in their order,
    sorted by disagreement, most first (ties: by image id)."""
    rows = [
        Row(i, image, list(references[i]), {m: (captions[m][i], dict(scores[m][i])) for m in captions})
        for i, image in images.items()
    ]
    return sorted(rows, key=lambda r: (tuple(-x for x in r.disagreement()), r.image_id))


def _data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((THUMB, THUMB), Image.BILINEAR).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sheet_html(rows: Sequence[Row], title: str) -> str:
    """The whole sheet as one self-contained HTML page."""
    models = list(rows[0].captions) if rows else []
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    for row in rows:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row.references)
        cells = "".join(
            f'<td><p class="caption">{html.escape(caption)}</p>'
            f'<p class="score">BLEU-4 {s["bleu4"]:.3f} &middot; CIDEr-D {s["cider_d"]:.3f}</p></td>'
            for caption, s in row.captions.values()
        )
        body.append(
            f'<tr><td><img src="{_data_uri(row.image)}" alt="image {row.image_id}"><br>{row.image_id}</td>'
            f"<td><ul>{refs}</ul></td>{cells}</tr>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }}
ul {{ margin: 0; padding-left: 1.2em; }}
.caption {{ margin: 0 0 4px; }}
.score {{ margin: 0; color: #555; font-size: 0.85em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} images, where the models disagree most first (distinct captions, then the spread of
per-image CIDEr-D). Scores are the COCO toolkit's per-image BLEU-4 and CIDEr-D.</p>
<table><thead><tr><th>image</th><th>references</th>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table></body></html>
"""


def sheet_png(rows: Sequence[Row], title: str) -> Image.Image:
    """The first PNG_ROWS rows as a picture: image, references, then each model's caption and scores."""
    rows = rows[:PNG_ROWS]
    font = ImageFont.load_default(size=13)
    column, wrap, line = 300, 44, 16
    models = list(rows[0].captions) if rows else []
    height = THUMB + 24
    header = 30
    sheet = Image.new("RGB", (THUMB + 8 + column * (1 + len(models)), header + line + height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 6), title, fill="black", font=font)
    for c, name in enumerate(["references", *models]):
        draw.text((THUMB + 8 + c * column, header), name, fill="black", font=font)
    for r, row in enumerate(rows):
        y = header + line + r * height
        sheet.paste(Image.fromarray(row.image).resize((THUMB, THUMB), Image.BILINEAR), (0, y))
        draw.text((4, y + THUMB + 2), str(row.image_id), fill="black", font=font)
        cells = ["\n".join(textwrap.shorten(ref, wrap * 2) for ref in row.references[:MAX_REFERENCES])]
        for caption, s in row.captions.values():
            cells.append(f"{caption}\nBLEU-4 {s['bleu4']:.3f}  CIDEr-D {s['cider_d']:.3f}")
        for c, text in enumerate(cells):
            wrapped = "\n".join(textwrap.fill(part, wrap) for part in text.split("\n"))
            draw.multiline_text((THUMB + 8 + c * column, y), wrapped, fill="black", font=font, spacing=2)
    return sheet
