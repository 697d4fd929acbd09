"""
Figures of video frames: labelled image grids (PNG) and side-by-side animations (GIF).

Frames are uint8 numpy arrays [H, W, 3]. Every figure enlarges them by nearest neighbour, by an
integer factor, until the short side is at least min_px pixels: the 32 px frames of the demo stay
readable and show their true pixels, while 512 px frames are drawn as they are. Text uses PIL's
default font, and the margins are sized from the measured text so that no label is clipped.
"""
import math

import numpy as np

import data
from machinery import need, written

# Pillow (requirements-sampling.txt): every sampling run draws its validation PNGs
Image, ImageDraw, ImageFont = (need(f'PIL.{m}', 'drawing the figures') for m in ('Image', 'ImageDraw', 'ImageFont'))

GAP = 4            # pixels between cells, and between a caption and its cell
MARGIN = 8         # pixels around the figure, between rows, and right of the row labels
FONT_SIZE = 13
LINE_SPACING = 2   # pixels between the lines of one label
ERROR_GAIN = 4     # the error maps show |prediction - truth| x 4


def _load_font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:   # Pillow < 10.1: only the small bitmap font, which has one size
        return ImageFont.load_default()


FONT = _load_font()
_MEASURE = ImageDraw.Draw(Image.new('RGB', (1, 1)))


def _text_size(text):
    """(width, height) in pixels of text drawn at (0, 0), blank lines and all."""
    if not text:
        return 0, 0
    _, _, right, bottom = _MEASURE.multiline_textbbox((0, 0), text, font=FONT, spacing=LINE_SPACING)
    return right, bottom


def _fit(text, width):
    """text broken into lines at most width pixels wide; a word too wide on its own ends in '...'."""
    lines = []
    for paragraph in text.split('\n'):
        line = ''
        for word in paragraph.split(' '):
            if _text_size(word)[0] > width:
                while len(word) > 1 and _text_size(word + '...')[0] > width:
                    word = word[:-1]
                word += '...'
            longer = f'{line} {word}' if line else word
            if line and _text_size(longer)[0] > width:
                lines.append(line)
                line = word
            else:
                line = longer
        lines.append(line)
    return '\n'.join(lines)


def _frame(img, name='frames'):
    img = np.asarray(img)
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"{name} must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    return img


def upscale(img_HWC, min_px=128):
    """The frame enlarged by nearest neighbour, by the smallest integer factor that makes its short side >= min_px."""
    img_HWC = _frame(img_HWC)
    factor = max(1, math.ceil(min_px / min(img_HWC.shape[:2])))
    return img_HWC.repeat(factor, axis=0).repeat(factor, axis=1)


def grid(rows, row_labels, col_labels=None, min_px=128, title=None):
    """Rows of frames (None = empty cell), each labelled on its left, under column headers or per-cell captions."""
    if not (len(rows) == len(row_labels) > 0):
        raise ValueError(f"need one label per row, got {len(rows)} rows and {len(row_labels)} labels")
    frames = [_frame(f) for row in rows for f in row if f is not None]
    if not frames:
        raise ValueError("the grid has no frames")
    shapes = sorted({f.shape for f in frames})
    if len(shapes) != 1:
        raise ValueError(f"all frames must have the same size, got {shapes}")
    h, w = upscale(frames[0], min_px).shape[:2]
    n_cols = max(len(row) for row in rows)
    # col_labels: one list of headers shared by all rows, or one list of captions per row
    per_row = col_labels is not None and len(col_labels) > 0 and not isinstance(col_labels[0], str)
    header = [] if col_labels is None or per_row else [_fit(c, w) for c in col_labels]
    captions = [[_fit(c, w) for c in row] for row in col_labels] if per_row else [[] for _ in rows]
    if len(header) > n_cols:
        raise ValueError(f"{len(header)} column labels for {n_cols} columns")
    if len(captions) != len(rows):
        raise ValueError(f"need one list of captions per row, got {len(captions)} for {len(rows)} rows")
    if not (all(len(c) <= n_cols for c in captions)):
        raise ValueError(f"a row has more captions than its {n_cols} columns")

    def band(labels):   # height of the text above a row of cells, gap included
        tallest = max((_text_size(t)[1] for t in labels), default=0)
        return tallest + GAP if tallest else 0

    label_w = max(_text_size(t)[0] for t in row_labels)
    left = MARGIN + (label_w + MARGIN if label_w else 0)
    title_w, title_h = _text_size(title)
    top = MARGIN + (title_h + MARGIN if title else 0) + band(header)
    row_tops = []   # the y of each row's cells
    for caps in captions:
        row_tops.append(top + band(caps))
        top = row_tops[-1] + h + MARGIN
    width = max(left + n_cols * w + (n_cols - 1) * GAP + MARGIN, MARGIN + title_w + MARGIN)
    canvas = Image.new('RGB', (width, top), 'white')
    draw = ImageDraw.Draw(canvas)

    def write(text, x, y):
        draw.multiline_text((x, y), text, fill='black', font=FONT, spacing=LINE_SPACING, align='center')

    if title:
        write(title, MARGIN, MARGIN)
    for j, text in enumerate(header):
        tw, th = _text_size(text)
        write(text, left + j * (w + GAP) + (w - tw) // 2, row_tops[0] - band(captions[0]) - GAP - th)
    for row, label, caps, y in zip(rows, row_labels, captions, row_tops):
        draw.multiline_text((MARGIN, y + (h - _text_size(label)[1]) // 2), label, fill='black', font=FONT,
                            spacing=LINE_SPACING)
        for j, frame in enumerate(row):
            x = left + j * (w + GAP)
            if frame is not None:
                canvas.paste(Image.fromarray(upscale(frame, min_px)), (x, y))
            if j < len(caps):
                tw, th = _text_size(caps[j])
                write(caps[j], x + (w - tw) // 2, y - GAP - th)
    return canvas


def error_map(pred_HWC, truth_HWC, gain=ERROR_GAIN):
    """|pred - truth| averaged over the colour channels, times gain, as a grey frame (clipped at 255)."""
    pred_HWC, truth_HWC = _frame(pred_HWC, 'the prediction'), _frame(truth_HWC, 'the truth')
    if pred_HWC.shape != truth_HWC.shape:
        raise ValueError(f"prediction {pred_HWC.shape} and truth {truth_HWC.shape} differ in size")
    err_HW = np.abs(pred_HWC.astype(np.int16) - truth_HWC.astype(np.int16)).mean(-1)
    return np.repeat(np.clip(err_HW * gain, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _context_row(context_THWC):
    context = [_frame(f, 'context frames') for f in context_THWC]
    return context, [f'frame {data.clip_frame_indices()[t]}' for t in range(len(context))]


def clip_figure(context_THWC, members_NHWC, mean_HWC, truth_HWC, min_px=128, title=None):
    """The context frames; under them the sampled frames 77, their mean, the truth and the mean's error map."""
    context, context_captions = _context_row(context_THWC)
    members = [_frame(f, 'ensemble members') for f in members_NHWC]
    predictions = [*members, mean_HWC, truth_HWC, error_map(mean_HWC, truth_HWC)]
    captions = [*(f'sample {i + 1}' for i in range(len(members))), 'ensemble mean', 'truth', f'error x{ERROR_GAIN}']
    return grid([context, predictions], ['context', 'prediction\nof frame 77'], [context_captions, captions],
                min_px, title)


def counterfactual_figure(context_THWC, futures, min_px=128, title=None):
    """The context frames; under them one row per state future: its predicted frame 77, its truth, the error map."""
    context, context_captions = _context_row(context_THWC)
    rows, labels, captions = [context], ['context'], [context_captions]
    for future in futures:
        missing = {'name', 'pred_HWC', 'truth_HWC', 'psnr_truth', 'psnr_orig'} - set(future)
        if missing:
            raise ValueError(f"future {future.get('name', '?')!r} lacks {sorted(missing)}")
        rows.append([future['pred_HWC'], future['truth_HWC'], error_map(future['pred_HWC'], future['truth_HWC'])])
        labels.append(f"{future['name']}\n{future['psnr_truth']:.1f} dB vs its truth\n"
                      f"{future['psnr_orig']:.1f} dB vs recorded")
        captions.append(['prediction', 'truth for these states', f'error x{ERROR_GAIN}'])
    return grid(rows, labels, captions, min_px, title)


def save_png(image, path, then='then run again'):
    """A figure (a PIL image) into path as PNG, whole or not at all: a full disk is one sentence (machinery.written)."""
    with written(str(path), then) as tmp:
        image.save(tmp, format='PNG')


def save_gif(path, frames_by_row, labels, min_px=128, fps=6, then='then run again'):
    """An endless GIF of clips [T, H, W, 3] side by side, labelled above, the raw frame index below (as save_png)."""
    clips = [np.asarray(c) for c in frames_by_row]
    if not (clips and len(clips[0]) > 0):
        raise ValueError("save_gif needs at least one clip of at least one frame")
    for clip in clips:
        if not (clip.dtype == np.uint8 and clip.ndim == 4 and clip.shape[3] == 3):
            raise ValueError(f"clips must be uint8 [T, H, W, 3], got {clip.dtype} {clip.shape}")
    if len({c.shape for c in clips}) != 1:
        raise ValueError(f"the clips must have the same shape, got {[c.shape for c in clips]}")
    if len(labels) != len(clips):
        raise ValueError(f"need one label per clip, got {len(labels)} for {len(clips)} clips")
    pages = []
    for t in range(len(clips[0])):
        figure = grid([[clip[t] for clip in clips]], [''], labels, min_px)
        counter = f'frame {data.clip_frame_indices()[t]} of the clip'   # the raw frame clip frame t shows
        page = Image.new('RGB', (figure.width, figure.height + _text_size(counter)[1] + MARGIN), 'white')
        page.paste(figure, (0, 0))
        ImageDraw.Draw(page).text((MARGIN, figure.height), counter, fill='black', font=FONT)
        pages.append(page)
    # one palette for every page, so that with disposal=1 (each page stays under the next) Pillow stores
    # only the pixels that change: a few tens of kB instead of a few hundred
    palette = Image.fromarray(np.concatenate([np.asarray(p) for p in pages])).quantize(256)
    pages = [p.quantize(palette=palette, dither=Image.Dither.NONE) for p in pages]
    with written(str(path), then) as tmp:
        pages[0].save(tmp, format='GIF', save_all=True, append_images=pages[1:], duration=round(1000 / fps), loop=0,
                      disposal=1)
