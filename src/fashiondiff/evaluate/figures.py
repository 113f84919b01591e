"""Report figures: the sample grid and the image + text figure, as PIL images.

Usage::

    sample_grid(captions, {"real": reals, "base": bases, "tuned": tuneds}).save("grid.png")
    beside([titled("catalogue", grid_a), titled("generic", grid_b)]).save("grid.png")
    image_text_figure("black leather mini skirt", source, {"base": b, "tuned": t}).save("it.png")

Small images are enlarged with nearest-neighbour to at least ``MIN_CELL`` pixels, so a
64-pixel sample stays legible and shows its true resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 192
PAD = 6
FONT_SIZE = 14
BACKGROUND = "white"
INK = "black"


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (needs FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def wrap(text: str, face, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; an ellipsis ends text that does not fit."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if line and face.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and face.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines or [""]


def cell_size(images: Sequence[Image.Image]) -> int:
    return max([MIN_CELL, *(max(im.size) for im in images)])


def fit(image: Image.Image, size: int) -> Image.Image:
    """``image`` as a ``size`` square: nearest-neighbour up, Lanczos down."""
    if image.size == (size, size):
        return image.convert("RGB")
    resample = Image.NEAREST if max(image.size) <= size else Image.LANCZOS
    return image.convert("RGB").resize((size, size), resample)


def _text_band(lines: Sequence[str], width: int, face, line_height: int) -> Image.Image:
    band = Image.new("RGB", (width, PAD * 2 + line_height * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((PAD, PAD + i * line_height), line, fill=INK, font=face)
    return band


def _image_row(images: Sequence[Image.Image], cell: int) -> Image.Image:
    row = Image.new("RGB", (PAD + len(images) * (cell + PAD), cell + PAD), BACKGROUND)
    for j, image in enumerate(images):
        row.paste(fit(image, cell), (PAD + j * (cell + PAD), 0))
    return row


def _header(titles: Sequence[str], cell: int, face, line_height: int) -> Image.Image:
    band = Image.new("RGB", (PAD + len(titles) * (cell + PAD), PAD * 2 + line_height), BACKGROUND)
    draw = ImageDraw.Draw(band)
    for j, title in enumerate(titles):
        x = PAD + j * (cell + PAD) + (cell - face.getlength(title)) / 2
        draw.text((x, PAD), title, fill=INK, font=face)
    return band


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), BACKGROUND)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def sample_grid(captions: Sequence[str], columns: Mapping[str, Sequence[Image.Image]]) -> Image.Image:
    """Rows = prompts (caption above each row), columns = ``columns``' keys in order."""
    titles = list(columns)
    if any(len(col) != len(captions) for col in columns.values()):
        raise ValueError("sample_grid: every column needs one image per caption")
    cell = cell_size([im for col in columns.values() for im in col])
    face, bold = font(), font(FONT_SIZE + 2)
    line_height = FONT_SIZE + 4
    width = PAD + len(titles) * (cell + PAD)
    parts = [_header(titles, cell, bold, line_height + 2)]
    for i, caption in enumerate(captions):
        lines = wrap(f"{i + 1}. {caption}", face, width - 2 * PAD, max_lines=2)
        parts.append(_text_band(lines, width, face, line_height))
        parts.append(_image_row([columns[t][i] for t in titles], cell))
    return _stack(parts)


def titled(title: str, image: Image.Image) -> Image.Image:
    """``image`` under a bold ``title`` band."""
    face = font(FONT_SIZE + 6)
    return _stack([_text_band([title], image.width, face, FONT_SIZE + 10), image])


def beside(images: Sequence[Image.Image]) -> Image.Image:
    """``images`` left to right, top-aligned, a gap between them."""
    gap = 4 * PAD
    out = Image.new(
        "RGB", (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)), BACKGROUND
    )
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width + gap
    return out


def image_text_figure(
    prompt: str, source: Image.Image, results: Mapping[str, Image.Image], subtitle: str = ""
) -> Image.Image:
    """``source | results...`` with the prompt as the title (the method's image + text figure)."""
    images = [source, *results.values()]
    cell = cell_size(images)
    width = PAD + len(images) * (cell + PAD)
    title = wrap(f"prompt: \u201c{prompt}\u201d", font(FONT_SIZE + 4), width - 2 * PAD, max_lines=2)
    parts = [_text_band(title, width, font(FONT_SIZE + 4), FONT_SIZE + 8)]
    if subtitle:
        parts.append(_text_band(wrap(subtitle, font(), width - 2 * PAD, 2), width, font(), FONT_SIZE + 4))
    parts.append(_header(["source", *results], cell, font(FONT_SIZE + 2), FONT_SIZE + 6))
    parts.append(_image_row(images, cell))
    return _stack(parts)
