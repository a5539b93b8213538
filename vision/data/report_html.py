"""HTML building blocks of ``negvision data report``: pictures as ``data:`` URIs, small tables, thumbnails, and the
one self-contained page (inline CSS, no script, no external file: it opens from disk with no network)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

THUMB = 160  # longer side of a thumbnail, pixels


def esc(value: Any) -> str:
    """``value`` as HTML text (escaped)."""
    return html.escape(str(value), quote=True)


def image_data_uri(image: Image.Image, fmt: str = "JPEG", quality: int = 85) -> str:
    """A PIL image as a ``data:image/...;base64,`` URI (JPEG for photos, PNG for charts)."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    else:
        image.save(buf, format="PNG", optimize=True)
        mime = "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def figure_data_uri(fig: Any) -> str:
    """A matplotlib figure (``vision.viz.new_figure``) as a PNG ``data:`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def img_tag(uri: str, alt: str, cls: str = "") -> str:
    """An ``<img>`` of a ``data:`` URI."""
    klass = f' class="{esc(cls)}"' if cls else ""
    return f'<img{klass} src="{uri}" alt="{esc(alt)}">'


def thumbnail(path: str | Path, boxes: Any = None, labels: Any = None, class_names: Sequence[str] | None = None,
              size: int = THUMB, focus: Sequence[float] | None = None) -> Image.Image:
    """A small picture of image ``path`` (EXIF orientation applied), boxes drawn when given; ``focus`` (xyxy) crops
    a square around that region first (a 2 px box is visible); a grey tile when the file cannot be read."""
    from vision.io import ImageReadError, open_image
    from vision.viz import draw_boxes

    try:
        im = open_image(path, "RGB")
    except ImageReadError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    b = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if focus is not None:
        x1, y1, x2, y2 = (float(v) for v in focus)
        side = min(max(3 * max(x2 - x1, y2 - y1), 32.0), float(max(im.size)))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left = int(min(max(cx - side / 2, 0), max(im.width - side, 0)))
        top = int(min(max(cy - side / 2, 0), max(im.height - side, 0)))
        crop = (left, top, min(im.width, left + int(round(side))), min(im.height, top + int(round(side))))
        scale = size / max(crop[2] - crop[0], crop[3] - crop[1], 1)
        im = im.crop(crop).resize((max(1, round((crop[2] - crop[0]) * scale)), max(1, round((crop[3] - crop[1]) * scale))),
                                  Image.NEAREST if scale > 2 else Image.BILINEAR)
        if b is not None:
            b = (b - [left, top, left, top]) * scale
        width = 1
    else:
        width = max(1, round(max(im.size) / size))
    if b is not None and len(b):
        im = draw_boxes(im, b, labels, class_names=class_names, width=width,
                        font_size=max(10, round(max(im.size) / size * 10)))
    return ImageOps.contain(im, (size, size))


def thumb_tag(path: str | Path, caption: str, **kw: Any) -> str:
    """A ``<figure>`` with the thumbnail of ``path`` (inline JPEG) and a caption."""
    uri = image_data_uri(thumbnail(path, **kw))
    return f'<figure class="thumb">{img_tag(uri, caption)}<figcaption>{esc(caption)}</figcaption></figure>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """An HTML table (cells escaped; numbers right-aligned by the page's CSS)."""
    klass = f' class="{esc(cls)}"' if cls else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if isinstance(c, (int, float)) else ""}">{esc(_cell(c))}</td>'
                         for c in row) + "</tr>"
        for row in rows
    )
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def problem_list(problems: Sequence[str], limit: int = 50) -> str:
    """A list of problem lines (the first ``limit``, then how many more)."""
    if not problems:
        return ""
    items = "".join(f"<li>{esc(p)}</li>" for p in problems[:limit])
    more = f"<li>... and {len(problems) - limit} more (all in report.json)</li>" if len(problems) > limit else ""
    return f'<ul class="problems">{items}{more}</ul>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.headline{background:#f7f7f9;border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
.headline.severe{background:#fff0f0;border-color:#e0a0a0}
.severe-tag{color:#b00;font-weight:bold}.ok-tag{color:#070;font-weight:bold}
ul.problems li{color:#8a4b00}
img.chart{max-width:100%;height:auto;border:1px solid #eee}
figure.thumb{display:inline-block;margin:2px 6px 6px 0;text-align:center;vertical-align:top}
figure.thumb img{display:block;border:1px solid #ccc}
figure.thumb figcaption{font-size:.75em;max-width:170px;overflow-wrap:anywhere;color:#444}
.pair{border:1px solid #e4e4e4;border-radius:4px;padding:4px 6px;margin:6px 0;display:inline-block;
vertical-align:top;margin-right:8px}
.pair .what{font-size:.8em;color:#333;margin-bottom:2px}
nav ul{columns:2;list-style:none;padding-left:0}nav a{text-decoration:none}
.note{color:#666;font-size:.9em}
"""


def page(title: str, headline: str, sections: Sequence[tuple[str, str, str]], notes: Sequence[str] = ()) -> str:
    """The whole report page: ``sections`` as (anchor id, title, inner HTML); CSS inline, no script, no links out."""
    nav = "".join(f'<li><a href="#{esc(i)}">{esc(t)}</a></li>' for i, t, _ in sections)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(t)}</h2>{inner}</section>' for i, t, inner in sections)
    note_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # a page that can fetch nothing: every picture is a data: URI
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{headline}<nav><ul>{nav}</ul></nav>{body}{note_html}</body></html>\n"
    )
