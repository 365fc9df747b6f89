"""Synthetic image–caption corpora for tests, the quickstart and benchmarks.

Three corpora, each with its class names and the caption templates that name a class (so a
zero-shot evaluation can prompt with them):

- `shapes`: one coloured shape on a neutral background; the label is the shape's *colour*.
  A tiny model learns it within minutes on a CPU, and the mean pixel value nearly solves it,
  so it proves plumbing, not learning.
- `forms`: one shape of a random colour on a random contrasting background; the label is the
  *shape* (circle, square, triangle, diamond, star, cross). Colour carries no information.
- `characters`: a digit or letter rendered with one of several fonts, at a random size,
  position and rotation, in random ink on random paper, with sparse noise; the label is the
  character. Only the glyph's form tells the classes apart (`digits` is its 10-class subset).

Fonts come from matplotlib's own font folder (a dependency), so every machine renders the same
glyphs without system fonts.

`make_vqa_shards` writes VQA corpora of the `shapes` and `characters` images (vqa_questions lists their
questions): every image with every question of its corpus, ten annotators' answers each.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import random
import statistics
import string
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Shape colours at least 150 apart in RGB (orange and purple, 80-110 from their neighbours, took a tiny
# model several times longer to tell apart, and the quickstart's result swung with the data order).
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 230), "yellow": (235, 225, 30),
           "cyan": (30, 210, 220), "magenta": (210, 40, 210), "white": (245, 245, 245), "gray": (128, 128, 128),
           "black": (15, 15, 15)}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
BACKGROUNDS = ("white", "gray", "black")
SHAPES = ("circle", "square", "triangle")
FORMS = ("circle", "square", "triangle", "diamond", "star", "cross")
DIGITS = tuple(string.digits)
# Letters that some fonts draw like a digit or like each other (i, l, o beside 1 and 0) are left out.
CHARACTERS = DIGITS + tuple(letter for letter in string.ascii_lowercase if letter not in "ilo")
# Fonts of several families and styles; matplotlib ships them (mpl-data/fonts/ttf).
# Bold faces: at 64 px a regular face's strokes are 2-3 px, thinner than what a patch-8 ViT learns from
# in a short run.
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf")


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image file, its caption and its label (index into the corpus's class names)."""

    image_path: str
    caption: str
    label: int


DOMAINS = {"plain": BACKGROUNDS, "colourful": OBJECT_COLOURS, "dim": BACKGROUNDS}
"""Background colours by domain (the `shapes` corpus). `colourful` puts the shape on another strong colour;
`dim` is the plain domain at 40% brightness (a night-time shift: same captions, darker colours), the
shifted domain that fine-tuning demos adapt to. The other corpora darken their colours the same way in `dim`."""
BRIGHTNESS = {"dim": 0.4}


@dataclass(frozen=True)
class Corpus:
    """A generator of captioned images with a known label, and what a zero-shot evaluation of it needs."""

    name: str
    classnames: tuple[str, ...]
    """Class names; label i is classnames[i]."""
    templates: tuple[str, ...]
    """Prompt templates with `{}` for the class name: the caption vocabulary, for zero-shot prompting."""
    draw: Callable[[random.Random, int, str], tuple[Image.Image, str, int]]
    """(rng, size, domain) -> (image, caption, label)."""
    summary: str
    """What the label is, in a few words."""


@dataclass(frozen=True)
class ShapeScene:
    """A drawn `shapes` image and what it shows."""

    image: Image.Image
    colour: str
    shape: str
    background: str


def draw_shape_scene(rng: random.Random, size: int = 64, domain: str = "plain", *, colour: str | None = None,
                     shape: str | None = None, background: str | None = None) -> ShapeScene:
    """A `shapes` image: one shape of `colour` on `background`; what is not given is drawn at random (the
    background never the shape's colour)."""
    colour = colour or OBJECT_COLOURS[rng.randrange(len(OBJECT_COLOURS))]
    shape = shape or rng.choice(SHAPES)
    if background is None or background == colour:
        background = rng.choice([name for name in DOMAINS[domain] if name != colour])
    paint = {name: _dimmed(rgb, domain) for name, rgb in COLOURS.items()}
    image = Image.new("RGB", (size, size), paint[background])
    extent = rng.uniform(0.35, 0.7) * size
    left, top = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    _draw_form(ImageDraw.Draw(image), shape, (left, top, extent), paint[colour], rotation=0.0)
    return ShapeScene(image, colour, shape, background)


def draw_sample(rng: random.Random, size: int = 64, domain: str = "plain") -> tuple[Image.Image, str, int]:
    """A random `shapes` image with its caption and label (the shape's colour)."""
    scene = draw_shape_scene(rng, size, domain)
    colour, shape, background = scene.colour, scene.shape, scene.background
    caption = f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"
    return scene.image, caption, OBJECT_COLOURS.index(colour)


FORM_TEMPLATES = ("a {}", "a picture of a {}", "a coloured {}", "a {} on a plain background", "an image of a {}",
                  "a drawing of a {}", "a {} shape", "a small picture showing a {}")


def draw_form(rng: random.Random, size: int = 64, domain: str = "plain") -> tuple[Image.Image, str, int]:
    """A `forms` image: one shape of a random colour on a random background of clearly different
    lightness; the label is the shape, so colour tells nothing about it."""
    label = rng.randrange(len(FORMS))
    ink, paper = _contrasting_colours(rng, domain)
    image = Image.new("RGB", (size, size), paper)
    extent = rng.uniform(0.4, 0.8) * size
    left, top = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    _draw_form(ImageDraw.Draw(image), FORMS[label], (left, top, extent), ink, rotation=rng.uniform(-20, 20))
    return image, rng.choice(FORM_TEMPLATES).format(FORMS[label]), label


CHARACTER_TEMPLATES = ("the character {}", "a picture of the character {}", "the symbol {} written on paper",
                       "a printed {}", "an image of the sign {}", "the glyph {} in ink", "a scan of a {}",
                       "{} written in some font")


def draw_character(rng: random.Random, size: int = 64, domain: str = "plain", *,
                   charset: tuple[str, ...] = CHARACTERS,
                   colours: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
                   ) -> tuple[Image.Image, str, int]:
    """A `characters` image: one glyph in a random bold font, size, rotation and position near the centre,
    dark ink of random colour on light paper of random colour (or the (ink, paper) `colours` given), plus
    sparse speckle; the label is the character."""
    label = rng.randrange(len(charset))
    ink, paper = colours or _contrasting_colours(rng, domain)
    font = _font(rng.choice(FONT_FILES), round(rng.uniform(0.55, 0.85) * size))
    glyph = Image.new("L", (size * 2, size * 2), 0)  # drawn large, rotated, then cropped to its ink
    ImageDraw.Draw(glyph).text((size, size), charset[label], font=font, fill=255, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    glyph = glyph.crop(glyph.getbbox() or (0, 0, 1, 1))
    if max(glyph.size) > size * 0.9:
        scale = size * 0.9 / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR)
    image = Image.new("RGB", (size, size), paper)
    jitter = size * 0.12  # around the centre, inside the image

    def place(extent: int) -> int:
        return round(min(max((size - extent) / 2 + rng.uniform(-jitter, jitter), 0), size - extent))

    position = (place(glyph.width), place(glyph.height))
    image.paste(Image.new("RGB", glyph.size, ink), position, glyph)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(0, size // 8)):  # dust and scanner speckle
        x, y = rng.randrange(size), rng.randrange(size)
        draw.point((x, y), fill=ink if rng.random() < 0.5 else paper)
    return image, rng.choice(CHARACTER_TEMPLATES).format(charset[label]), label


def draw_digit(rng: random.Random, size: int = 64, domain: str = "plain") -> tuple[Image.Image, str, int]:
    """A `digits` image: draw_character over 0-9 only."""
    return draw_character(rng, size, domain, charset=DIGITS)


CORPORA: dict[str, Corpus] = {
    "shapes": Corpus("shapes", OBJECT_COLOURS,
                     tuple(f"a {{}} {shape} on a {background} background" for shape in SHAPES for background in BACKGROUNDS),
                     draw_sample, "the shape's colour"),
    "forms": Corpus("forms", FORMS, FORM_TEMPLATES, draw_form, "the shape, in random colours"),
    "characters": Corpus("characters", CHARACTERS, CHARACTER_TEMPLATES, draw_character,
                         "the character (digits and letters) in random fonts, sizes, rotations and colours"),
    "digits": Corpus("digits", DIGITS, CHARACTER_TEMPLATES, draw_digit,
                     "the digit in random fonts, sizes, rotations and colours"),
}


def corpus(name: str) -> Corpus:
    """The corpus called `name`, or an error that lists them."""
    if name not in CORPORA:
        raise ValueError(f"synthetic corpus {name!r} is unknown; choose one of {', '.join(CORPORA)}")
    return CORPORA[name]


def write_zeroshot_files(folder: str | os.PathLike, corpus_name: str) -> tuple[Path, Path]:
    """`classnames.txt` and `templates.txt` for zero-shot evaluation of a corpus; returns their paths."""
    chosen, folder = corpus(corpus_name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classnames, templates = folder / "classnames.txt", folder / "templates.txt"
    classnames.write_text("".join(f"{name}\n" for name in chosen.classnames), encoding="utf-8")
    templates.write_text("".join(f"{template}\n" for template in chosen.templates), encoding="utf-8")
    return classnames, templates


def _dimmed(rgb: tuple[int, int, int], domain: str) -> tuple[int, int, int]:
    return tuple(round(channel * BRIGHTNESS.get(domain, 1.0)) for channel in rgb)


def _contrasting_colours(rng: random.Random, domain: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Dark ink on light paper, each of random hue and saturation, their lightness at least 0.25 apart."""
    ink_light, paper_light = rng.uniform(0.05, 0.4), rng.uniform(0.65, 0.95)

    def colour(lightness: float) -> tuple[int, int, int]:
        rgb = colorsys.hls_to_rgb(rng.random(), lightness, rng.uniform(0.0, 0.9))
        return _dimmed(tuple(round(channel * 255) for channel in rgb), domain)

    return colour(ink_light), colour(paper_light)


def _draw_form(draw: ImageDraw.ImageDraw, form: str, box: tuple[float, float, float], fill, *, rotation: float):
    """Draw `form` filling the square (left, top, extent), rotated by `rotation` degrees about its centre."""
    left, top, extent = box
    if form == "circle":
        draw.ellipse((left, top, left + extent, top + extent), fill=fill)
        return
    corners = {
        "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
        "triangle": [(0.5, 0), (1, 1), (0, 1)],
        "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
        "cross": [(0.35, 0), (0.65, 0), (0.65, 0.35), (1, 0.35), (1, 0.65), (0.65, 0.65), (0.65, 1), (0.35, 1),
                  (0.35, 0.65), (0, 0.65), (0, 0.35), (0.35, 0.35)],
        "star": [(0.5 + 0.5 * (1 if i % 2 == 0 else 0.4) * math.sin(i * math.pi / 5),
                  0.5 - 0.5 * (1 if i % 2 == 0 else 0.4) * math.cos(i * math.pi / 5)) for i in range(10)],
    }[form]
    angle = math.radians(rotation)
    centre = (left + extent / 2, top + extent / 2)
    points = []
    for x, y in corners:
        dx, dy = (x - 0.5) * extent, (y - 0.5) * extent
        points.append((centre[0] + dx * math.cos(angle) - dy * math.sin(angle),
                       centre[1] + dx * math.sin(angle) + dy * math.cos(angle)))
    draw.polygon(points, fill=fill)


_FONTS: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    key = (name, size)
    if key not in _FONTS:
        import matplotlib

        _FONTS[key] = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
    return _FONTS[key]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_image_folder(path: str | os.PathLike, n: int, *, size: int = 64, seed: int = 0,
                      image_format: str = "jpg", labels: bool = False, domain: str = "plain",
                      corpus_name: str = "shapes") -> list[SyntheticSample]:
    """Write n images (`000000.jpg`) with same-stem captions (`000000.txt`) and, if asked, labels (`.cls`).

    `image_format` is a file extension PIL can write (jpg, png, webp); the same seed gives
    the same files. `corpus_name` picks the generator (see CORPORA).
    """
    draw = corpus(corpus_name).draw
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for index in range(n):
        image, caption, label = draw(rng, size, domain)
        image_path = folder / f"{index:06d}.{image_format}"
        image.save(image_path, quality=90) if image_format in ("jpg", "jpeg") else image.save(image_path)
        (folder / f"{index:06d}.txt").write_text(caption + "\n", encoding="utf-8")
        if labels:
            (folder / f"{index:06d}.cls").write_text(f"{label}\n", encoding="ascii")
        samples.append(SyntheticSample(str(image_path), caption, label))
    return samples


def make_synthetic_shards(output_dir: str | os.PathLike, n: int, *, samples_per_shard: int = 16,
                          size: int = 64, seed: int = 0, labels: bool = True, domain: str = "plain",
                          corpus_name: str = "shapes") -> list[str]:
    """Write n synthetic samples as shards with the real make_shards pipeline; returns the shard paths."""
    from mmscale.shards.sharding import ShardingOptions, make_shards
    from mmscale.shards.sources import InputOptions

    with tempfile.TemporaryDirectory(prefix="mmscale-synthetic-") as folder:
        make_image_folder(folder, n, size=size, seed=seed, labels=labels, domain=domain, corpus_name=corpus_name)
        summary = make_shards(ShardingOptions(input=InputOptions(path=folder, kind="folder"),
                                              output_dir=str(output_dir), samples_per_shard=samples_per_shard,
                                              workers=1, progress=False))
    return [os.path.join(str(output_dir), name) for name in summary.sizes]


@dataclass(frozen=True)
class VqaQuestion:
    """A question a generated VQA corpus asks of every image, and the answers it can have."""

    text: str
    question_type: str
    answers: tuple[str, ...]


# Paper of the VQA `characters` corpus: four light colours of distinct hue, lightness 0.7-0.92 as the caption
# corpus's paper (draw_character), with its dark ink of random colour: the same images the `characters` captions
# show, so a model pretrained on them reads these. (Light ink on dark paper, tried first, is an image pretraining
# never shows: a linear probe of a pretrained model's image features read 0.32 of the characters with half the
# papers dark, 0.48 with these.) Four balanced answers, not "is the paper white?": two-answer questions score 0.65
# answered blind (the wrong half still matches the annotators who disagree), which with "digit or letter" would
# put the blind prior over 0.4.
PAPER_COLOURS = {"white": (235, 235, 235), "yellow": (250, 230, 110), "pink": (245, 175, 200), "blue": (165, 205, 250)}
# "a" is left out: the VQA evaluation drops articles, so the answer "a" would normalize to nothing.
VQA_CHARACTERS = tuple(character for character in CHARACTERS if character != "a")
VQA_LETTERS = tuple(character for character in VQA_CHARACTERS if character not in DIGITS)
ANNOTATORS = 10  # answers per question, as in VQA v2
DISAGREEMENT = 0.1  # chance that an annotator gives another answer of the question
MAX_DISAGREEING = 3  # so the true answer is always given by at least 7 of the 10
OTHER_SPELLING = 0.2  # chance that an agreeing annotator writes it another way the VQA normalization undoes
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def vqa_questions(corpus_name: str = "shapes", domain: str = "plain") -> tuple[VqaQuestion, ...]:
    """The questions a generated VQA corpus asks of every image (so a question alone says nothing about the
    image), with their possible answers; their union is the corpus's answer list."""
    if corpus_name == "shapes":
        return (VqaQuestion("what colour is the shape?", "colour", OBJECT_COLOURS),
                VqaQuestion("what shape is it?", "shape", SHAPES),
                VqaQuestion("what colour is the background?", "background", DOMAINS[domain]))
    if corpus_name == "characters":
        return (VqaQuestion("which character is this?", "character", VQA_CHARACTERS),
                VqaQuestion("is it a digit or a letter?", "digit or letter", ("digit", "letter")),
                VqaQuestion("what colour is the paper?", "paper colour", tuple(PAPER_COLOURS)))
    raise ValueError(f"VQA corpus {corpus_name!r} is unknown; choose shapes or characters")


def make_vqa_shards(output_dir: str | os.PathLike, n_images: int, *, corpus: str = "shapes",
                    samples_per_shard: int = 64, seed: int = 0, size: int = 64, domain: str = "plain") -> Path:
    """Write a generated VQA corpus as shards with the real make_shards pipeline (a jsonl table of image,
    question, answers, question type and label; sizes.json included); returns the output folder.

    Each of the `n_images` images gets every question of `vqa_questions(corpus)`, one sample (key) per
    question: `KEY.jpg`, `KEY.json` {"question", "answers", "question_type"} and `KEY.cls` (the base corpus's
    label: the shape's colour, the character's index in CHARACTERS). Each answer's attributes are balanced
    over the images (a shuffled cycle), so the question-only prior is as low as the answers allow. Ten
    answers per question, as VQA v2 annotators give: each another answer of the question with chance 0.1 (at
    most 3 of the 10), else the true one, written now and then as "Red", "red." or "a red" (what the VQA
    normalization maps back to it). The same seed gives the same shards.
    """
    from mmscale.shards.sharding import ShardingOptions, make_shards
    from mmscale.shards.sources import InputOptions

    questions = vqa_questions(corpus, domain)
    rng = random.Random(seed)
    draw = _vqa_drawer(corpus, rng, n_images, size=size, domain=domain)
    with tempfile.TemporaryDirectory(prefix="mmscale-vqa-") as folder:
        rows = []
        for index in range(n_images):
            image, label, truths = draw()
            name = f"{index:06d}.jpg"
            image.save(os.path.join(folder, name), quality=90)
            for question, truth in zip(questions, truths):
                rows.append({"image": name, "question": question.text, "question_type": question.question_type,
                             "answers": _annotator_answers(rng, truth, question.answers), "label": label})
        table = os.path.join(folder, "questions.jsonl")
        with open(table, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        make_shards(ShardingOptions(
            input=InputOptions(path=table, kind="jsonl", image_root=folder, label_column="label",
                               question_column="question", answer_column="answers",
                               question_type_column="question_type"),
            output_dir=str(output_dir), samples_per_shard=samples_per_shard, workers=1, progress=False))
    return Path(output_dir)


def _vqa_drawer(corpus_name: str, rng: random.Random, n_images: int, *, size: int, domain: str
                ) -> Callable[[], tuple[Image.Image, int, tuple[str, ...]]]:
    """A function drawing the next image: (image, label, the true answer of each question in order)."""
    if corpus_name == "shapes":
        colours, shapes = _balanced(rng, OBJECT_COLOURS, n_images), _balanced(rng, SHAPES, n_images)
        backgrounds = _balanced(rng, DOMAINS[domain], n_images)

        def draw_shapes() -> tuple[Image.Image, int, tuple[str, ...]]:
            scene = draw_shape_scene(rng, size, domain, colour=colours.pop(), shape=shapes.pop(),
                                     background=backgrounds.pop())
            return scene.image, OBJECT_COLOURS.index(scene.colour), (scene.colour, scene.shape, scene.background)

        return draw_shapes
    vqa_questions(corpus_name)  # names the corpora there are
    kinds, papers = _balanced(rng, ("digit", "letter"), n_images), _balanced(rng, tuple(PAPER_COLOURS), n_images)

    def draw_characters() -> tuple[Image.Image, int, tuple[str, ...]]:
        kind, paper = kinds.pop(), papers.pop()
        ink, _ = _contrasting_colours(rng, domain)
        colours = (ink, _dimmed(PAPER_COLOURS[paper], domain))
        charset = DIGITS if kind == "digit" else VQA_LETTERS
        image, _, index = draw_character(rng, size, domain, charset=charset, colours=colours)
        return image, CHARACTERS.index(charset[index]), (charset[index], kind, paper)

    return draw_characters


def _balanced(rng: random.Random, values: Sequence[str], n: int) -> list[str]:
    """n values, each as often as the others (to one), in random order."""
    items = [values[index % len(values)] for index in range(n)]
    rng.shuffle(items)
    return items


def _annotator_answers(rng: random.Random, truth: str, choices: Sequence[str]) -> list[str]:
    """Ten annotators' answers to a question whose true answer is `truth` (see make_vqa_shards)."""
    others = [choice for choice in choices if choice != truth]
    answers, disagreeing = [], 0
    for _ in range(ANNOTATORS):
        if others and disagreeing < MAX_DISAGREEING and rng.random() < DISAGREEMENT:
            answers.append(rng.choice(others))
            disagreeing += 1
        elif rng.random() < OTHER_SPELLING:
            answers.append(rng.choice(other_spellings(truth)))
        else:
            answers.append(truth)
    return answers


def other_spellings(answer: str) -> list[str]:
    """Ways of writing `answer` that the VQA v2 normalization maps back to it: capitalized, a final period, an
    article before a word, a digit's number word."""
    spellings = [answer + "."]
    if answer.capitalize() != answer:
        spellings.append(answer.capitalize())
    if answer.isdigit():
        spellings.append(_NUMBER_WORDS[int(answer)])
    elif len(answer) > 1:
        spellings.append(f"{_article(answer)} {answer}")
    return spellings


def question_only_prior(samples: Iterable[tuple[str, Sequence[str]]]) -> float:
    """How well the questions can be answered without the image: each question answered with its most
    frequent normalized answer over all `(question, answers)` samples (ties: the first alphabetically), scored
    with VQA accuracy (mmscale.data.vqa.answer_accuracy), averaged over a question's samples, then over the
    questions."""
    from mmscale.data.vqa import answer_accuracy, normalize_answer

    by_question: dict[str, list[Sequence[str]]] = defaultdict(list)
    for question, answers in samples:
        by_question[question].append(answers)
    scores = []
    for answer_sets in by_question.values():
        counts = Counter(normalize_answer(answer) for answers in answer_sets for answer in answers)
        counts.pop("", None)
        best = min(counts, key=lambda answer: (-counts[answer], answer)) if counts else ""
        scores.append(statistics.fmean(answer_accuracy(best, list(answers)) for answers in answer_sets))
    return statistics.fmean(scores) if scores else 0.0
