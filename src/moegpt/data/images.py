"""Image-text data that ships with the machine, for the vision stages (no downloads):

- **Rendered text**: short lines of the standard library's code drawn with Pillow (a Debian
  DejaVu font when installed, else Pillow's own), captioned with the line itself. The task is
  to transcribe them: the seed's "rendered LaTeX/text" data and its purpose, agents that read
  what is in images. Each line keeps its file's key, so held-out files are never trained on.
- **Word lines**: the same, but each line is one file's words in a random order, which no
  language model can recall from a glimpse and which must therefore be read.
- **Fashion-MNIST** from Debian's ``dataset-fashion-mnist`` (70,000 28x28 grey images of ten
  kinds of clothing, MIT): two items composed onto one canvas side by side or stacked and
  captioned with where each is ("a sneaker to the left of a bag"), so a caption cannot be
  guessed without the image; training items optionally mirrored and shifted.

Images are grey ``uint8`` arrays (height, width); captions are plain text.
"""

from __future__ import annotations

import gzip
import itertools
import multiprocessing
import string
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moegpt.config import IMAGE_CORPORA, RENDERED_CORPUS, WORD_LINES_CORPUS
from moegpt.console import progress, stderr
from moegpt.errors import UserError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The dataset's class names, as captions say them
FASHION_CLASSES = (
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FONT_CANDIDATES = (  # Debian's fonts-dejavu-core: monospaced, so lines wrap predictably
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"),
)
PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation + " ")
DRAW_CHUNK = 1024  # lines a drawing worker takes at a time


@dataclass(frozen=True)
class ImageText:
    key: str  # where it came from (a module, a dataset index): what held-out splits go by
    image: np.ndarray  # (height, width) uint8
    caption: str


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped): a magic number naming the element type and the
    number of dimensions, each dimension's size (big-endian int32), then the elements."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: not a readable gzipped IDX file ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">i4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(shape)):
        raise UserError(f"{path}: holds {len(data) - start} bytes for a {shape} array")
    return np.frombuffer(data, np.uint8, offset=start).reshape(shape)


def fashion_mnist(split: str, folder: Path = FASHION_MNIST) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 28, 28) and labels (n,) of the ``train`` or ``test`` split."""
    images_file, labels_file = (folder / name for name in FASHION_FILES[split])
    if not images_file.is_file():
        raise UserError(
            f"{images_file}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
        )
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise UserError(f"{folder}: {images.shape[0]} images but {labels.shape} labels")
    return images, labels


def compose(
    first: np.ndarray, second: np.ndarray, names: tuple[str, str], horizontal: bool
) -> tuple[np.ndarray, str]:
    """Two items on one canvas twice their size: ``first`` left of (or above) ``second``,
    each centred in its half of the other direction; the caption says where each is."""
    size = first.shape[0]
    canvas = np.zeros((2 * size, 2 * size), np.uint8)
    middle = size // 2
    if horizontal:
        canvas[middle : middle + size, :size] = first
        canvas[middle : middle + size, size:] = second
        return canvas, f"a {names[0]} to the left of a {names[1]}"
    canvas[:size, middle : middle + size] = first
    canvas[size:, middle : middle + size] = second
    return canvas, f"a {names[0]} above a {names[1]}"


def augmented(item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``item`` mirrored left-right half the time and shifted by up to ``AUGMENT_SHIFT``
    pixels each way, the uncovered edge filled with the dataset's black background and the
    pixels shifted out lost (as a padded random crop loses them): the usual Fashion-MNIST
    augmentation, which gives an encoder more distinct views of the 60,000 training items
    than it can learn by heart."""
    if rng.integers(2):
        item = item[:, ::-1]
    dy, dx = rng.integers(-AUGMENT_SHIFT, AUGMENT_SHIFT + 1, size=2)
    padded = np.pad(item, AUGMENT_SHIFT)
    rows, cols = item.shape
    return padded[AUGMENT_SHIFT + dy :, AUGMENT_SHIFT + dx :][:rows, :cols]


def fashion_canvases(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    seed: int,
    prefix: str,
    augment: bool = False,
) -> Iterator[ImageText]:
    """``count`` canvases of two items each, drawn from ``images`` with ``seed``, each item
    :func:`augmented` with ``augment`` (by a generator of its own: the same pairs either way)."""
    rng = np.random.default_rng(seed)
    views = np.random.default_rng([seed, 1])
    for i in range(count):
        a, b = rng.choice(len(images), size=2, replace=False)
        names = (FASHION_CLASSES[labels[a]], FASHION_CLASSES[labels[b]])
        horizontal = bool(rng.integers(2))
        first, second = images[a], images[b]
        if augment:
            first, second = augmented(first, views), augmented(second, views)
        image, caption = compose(first, second, names, horizontal)
        yield ImageText(f"{prefix}:{i}", image, caption)


def short_lines(files: list[Path], root: Path, max_chars: int) -> list[tuple[str, str]]:
    """(key, line) for each distinct line of code of ``files`` that is between 8 and
    ``max_chars`` characters once stripped, in printable ASCII, and not a comment; the key is
    its file's, as stdlib:code and stdlib:text key the file (held out with them)."""
    from moegpt.data.sources import stdlib_key

    seen: set[str] = set()
    lines = []
    for path in files:
        key = stdlib_key(path, root)
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if not 8 <= len(line) <= max_chars or line.startswith("#") or line in seen:
                continue
            if set(line) <= PRINTABLE:
                seen.add(line)
                lines.append((key, line))
    return lines


def file_words(files: list[Path], root: Path, max_chars: int) -> list[tuple[str, list[str]]]:
    """(key, words) for each of ``files`` that has any: the whitespace-separated words of its
    printable-ASCII lines, comments included, each at most ``max_chars`` long."""
    from moegpt.data.sources import stdlib_key

    found = []
    for path in files:
        words = [
            word
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines()
            for word in raw.split()
            if len(word) <= max_chars and set(word) <= PRINTABLE
        ]
        if words:
            found.append((stdlib_key(path, root), words))
    return found


def word_lines(
    files: list[Path], root: Path, seed: int, max_chars: int
) -> Iterator[tuple[str, str]]:
    """Endless (key, line): lines of 8 to ``max_chars`` characters, each of words drawn at
    random from one file (chosen in proportion to its words) and keyed by it. The first n
    lines are the same whatever is read after them.

    Their order is no one's, so a language model cannot recall such a line from a glimpse of
    it, as it can a line of the code it trained on: the model has to read every word. The
    words themselves are real (identifiers, keywords, numbers, punctuation as the code spells
    them, and the comments' and docstrings' prose), drawn as often as the files use them, so
    the spelling a language model knows still helps."""
    by_file = file_words(files, root, max_chars)
    sizes = np.array([len(words) for _, words in by_file], np.float64)
    share = sizes / sizes.sum()
    rng = np.random.default_rng(seed)
    while True:
        key, words = by_file[rng.choice(len(by_file), p=share)]
        target = int(rng.integers(8, max_chars + 1))
        line = words[rng.integers(len(words))]
        while len(line) < target:
            word = words[rng.integers(len(words))]
            if len(line) + 1 + len(word) > max_chars:
                break
            line += " " + word
        if len(line) >= 8:
            yield key, line


def _draw_chunk(
    lines: list[tuple[str, str]], image_size: int, font_size: int
) -> list[np.ndarray | None]:
    """Each line drawn, or None where it does not fit the image: one worker's share."""
    drawn: list[np.ndarray | None] = []
    for _, line in lines:
        try:
            drawn.append(render(line, image_size, font_size))
        except ValueError:  # too long for this image at this font size
            drawn.append(None)
    return drawn


def _chunked(lines: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    it = iter(lines)
    while chunk := list(itertools.islice(it, DRAW_CHUNK)):
        yield chunk


def _drawn_in_order(
    pool: ProcessPoolExecutor,
    ahead: int,
    chunks: Iterator[list[tuple[str, str]]],
    size: int,
    font: int,
) -> Iterator[tuple[list[tuple[str, str]], list[np.ndarray | None]]]:
    """(chunk, its drawings) in order, ``ahead`` chunks at most in the pool: no more are
    drawn than the caller reads, so a source that stops at ``items`` stops drawing there."""
    pending: deque[tuple[list[tuple[str, str]], Future[list[np.ndarray | None]]]] = deque()
    for chunk in chunks:
        pending.append((chunk, pool.submit(_draw_chunk, chunk, size, font)))
        if len(pending) >= ahead:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def draw_lines(
    lines: Iterable[tuple[str, str]],
    *,
    items: int,
    image_size: int,
    workers: int,
    expected: int | None,
) -> list[ImageText]:
    """The first ``items`` (0: all) of ``lines`` (key, text) that fit the image, drawn at a
    font size of a sixth of it by up to ``workers`` processes, in order (the same images as
    one process draws), with a progress bar over chunks of the ``expected`` lines (None:
    unknown). The workers start from a fresh interpreter (forkserver), never a fork of a
    process that may hold a GPU context or a console lock."""
    font_size = max(6, image_size // 6)
    made: list[ImageText] = []
    chunks = None if expected is None else -(-expected // DRAW_CHUNK)
    workers = min(workers, chunks or workers)
    with ExitStack() as stack:
        batches = _chunked(lines)
        if workers > 1:
            context = multiprocessing.get_context("forkserver")
            pool = ProcessPoolExecutor(workers, mp_context=context)
            # an early stop at ``items`` drops the look-ahead chunks not yet started
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = _drawn_in_order(pool, 2 * workers, batches, image_size, font_size)
        else:
            results = ((batch, _draw_chunk(batch, image_size, font_size)) for batch in batches)
        for batch, drawn in progress(results, f"drawing {image_size}-pixel lines", chunks):
            for (key, line), image in zip(batch, drawn, strict=True):
                if image is not None:
                    made.append(ImageText(key, image, line))
                if items and len(made) == items:
                    return made
    return made


def load_font(size: int):  # -> ImageFont.FreeTypeFont | ImageFont.ImageFont
    """A monospaced DejaVu font when Debian's fonts are installed, else Pillow's own."""
    from PIL import ImageFont

    for path in FONT_CANDIDATES:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def font_name() -> str:
    """Which font :func:`render` draws with (part of a prepared source's fingerprint)."""
    return next((p.name for p in FONT_CANDIDATES if p.is_file()), "pillow-default")


def render(text: str, image_size: int, font_size: int) -> np.ndarray:
    """``text`` drawn black on white, wrapped at character boundaries to the image's width,
    as an (image_size, image_size) uint8 array. Text that does not fit is an error."""
    from PIL import Image, ImageDraw

    font = load_font(font_size)
    margin = max(1, font_size // 4)
    rows, row = [], ""
    for char in text:
        if row and font.getlength(row + char) > image_size - 2 * margin:
            rows.append(row)
            row = ""
        row += char
    rows.append(row)
    line_height = font_size + max(1, font_size // 5)
    if margin + len(rows) * line_height > image_size:
        raise ValueError(
            f"{text!r} needs {len(rows)} rows of {font_size}-pixel text; a {image_size}-pixel "
            "image holds fewer"
        )
    image = Image.new("L", (image_size, image_size), 255)
    draw = ImageDraw.Draw(image)
    for i, content in enumerate(rows):
        draw.text((margin, margin + i * line_height), content, fill=0, font=font)
    return np.asarray(image, dtype=np.uint8)


RENDERED_MAX_CHARS = 32
RENDERED_CORPORA = (RENDERED_CORPUS, WORD_LINES_CORPUS)
# How each corpus is made, in its fingerprint: change one when changing what it makes, so that
# prepared data from before is rebuilt rather than reused
WORD_LINES_VERSION = "word-lines-1"
AUGMENT_VERSION = "mirror-shift-1"
# stdlib:rendered-words draws at most this many lines per item asked for, for the lines that
# do not fit the image; an image that fits fewer is refused
WORD_LINES_TRIES = 4
# How rendered lines are keyed for the split, in their fingerprint: lines were keyed by module
# name before, which no other source shares (prepared data from then is rebuilt).
RENDERED_KEYS = "keyed-by-file"
FASHION_ITEMS = 10_000  # canvases made when a source asks for 0 (all)
AUGMENT_SHIFT = 2  # pixels each way a training item may move with augment = true


@dataclass
class ImageCorpus:
    """An image_text source's items: captions (the documents), keys, images (n, size, size),
    and, where the dataset has its own test split, which items are held out."""

    files: list[Path]
    fingerprint: str
    keys: list[str]
    documents: list[str]
    images: np.ndarray
    held_out: np.ndarray | None = None  # bool per item; None: split by key as text is


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.uint8)


def image_corpus_files(path: str) -> list[Path]:
    """The files the built-in image-text corpus ``path`` is made from."""
    from moegpt.data.sources import stdlib_python_files

    if path in RENDERED_CORPORA:
        return stdlib_python_files()
    return [FASHION_MNIST / name for pair in FASHION_FILES.values() for name in pair]


def image_corpus_fingerprint(
    path: str,
    items: int,
    val_fraction: float,
    image_size: int,
    seed: int,
    augment: bool = False,
) -> str:
    """What :func:`load_image_corpus` makes from these settings, without making it: its files
    (sizes and times) and everything that decides how items are drawn."""
    from moegpt.data.sources import EXTRACTION_VERSION, files_fingerprint

    settings = f"{EXTRACTION_VERSION}:{path}:{items}:{image_size}:{seed}:{val_fraction}"
    settings += f":{AUGMENT_VERSION}:{AUGMENT_SHIFT}" if augment else ""
    if path == WORD_LINES_CORPUS:
        settings += f":{WORD_LINES_VERSION}"
    if path in RENDERED_CORPORA:
        settings += f":{font_name()}:{RENDERED_KEYS}"
    return files_fingerprint(image_corpus_files(path), settings)


def load_image_corpus(
    path: str,
    items: int,
    val_fraction: float,
    image_size: int,
    seed: int,
    where: str,
    augment: bool = False,
    workers: int = 1,
) -> ImageCorpus:
    """The items of the built-in image-text corpus ``path`` at ``image_size`` pixels.

    ``stdlib:rendered``: ``items`` lines (0: all) of at most 32 characters, in a seeded order,
    drawn at a font size of a sixth of the image (lines that do not fit are left out), keyed
    by file as the other stdlib sources are. ``stdlib:rendered-words``: the same for ``items``
    lines of words in a random order (:func:`word_lines`). ``debian:fashion-mnist``: ``items``
    canvases (0: 10,000), the held-out share made from the dataset's test images, the
    training share's items :func:`augmented` with ``augment``. Lines are drawn by up to
    ``workers`` processes."""
    from moegpt.data.sources import stdlib_root

    if path not in IMAGE_CORPORA:
        raise UserError(f"{where}: unknown image-text corpus {path!r}")
    files = image_corpus_files(path)
    fingerprint = image_corpus_fingerprint(path, items, val_fraction, image_size, seed, augment)
    if path in RENDERED_CORPORA:
        lines: Iterable[tuple[str, str]]
        expected: int | None
        if path == WORD_LINES_CORPUS:
            drawn = word_lines(files, stdlib_root(), seed, RENDERED_MAX_CHARS)
            # how many are read to make ``items`` depends on how many fit: no total
            lines, expected = itertools.islice(drawn, WORD_LINES_TRIES * items), None
        else:
            found = short_lines(files, stdlib_root(), RENDERED_MAX_CHARS)
            lines = (found[i] for i in np.random.default_rng(seed).permutation(len(found)))
            expected = min(items, len(found)) if items else len(found)
        made = draw_lines(
            lines, items=items, image_size=image_size, workers=workers, expected=expected
        )
        if path == WORD_LINES_CORPUS and len(made) < items:
            raise UserError(
                f"{where}: only {len(made):,} of {WORD_LINES_TRIES * items:,} lines of "
                f"{path} fit a {image_size}-pixel image (vision.image_size), {items:,} asked"
            )
        return ImageCorpus(
            files,
            fingerprint,
            [m.key for m in made],
            [m.caption for m in made],
            np.stack([m.image for m in made])
            if made
            else np.zeros((0, image_size, image_size), np.uint8),
        )
    count = items or FASHION_ITEMS
    held = round(count * val_fraction)
    parts = []
    with stderr.status(f"composing {count:,} canvases ({path})"):
        for split, n, salt in (("train", count - held, 0), ("test", held, 1)):
            images, labels = fashion_mnist(split)
            views = augment and split == "train"
            parts += list(fashion_canvases(images, labels, n, seed + salt, split, augment=views))
    return ImageCorpus(
        files,
        fingerprint,
        [p.key for p in parts],
        [p.caption for p in parts],
        np.stack([_resized(p.image, image_size) for p in parts]),
        held_out=np.array([p.key.startswith("test:") for p in parts]),
    )
