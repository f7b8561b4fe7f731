"""Varied captions for digit images, and the word-level vocabulary they span."""

from __future__ import annotations

import random

from quantkit.zoo.digits_data import NUMBER_WORDS

# {w}: number word ("seven"), {d}: numeral ("7"). Many phrasings so the text tower learns the
# digit, not one template; the zero-shot prompts below are a subset a user would naturally type.
TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "number {w}, written by hand",
    "a handwritten digit {w}",
    "the number {w}",
    "a picture of a {w}",
    "an image of the digit {w}",
    "a photo of the number {d}",
    "{w}",
    "{d}",
    "a {d} written by hand",
    "handwritten number {d}",
    "a scanned digit {w}",
    "a drawing of the number {w}",
    "the digit {w}",
    "a small blurry {w}",
    "a white {w} on a black background",
)
ZERO_SHOT_TEMPLATES = ("a handwritten {w}", "the digit {d}", "the number {w}", "a picture of a {w}")
# Extra words so prompts a little off the templates still tokenize to known words.
EXTRA_WORDS = ("of", "and", "written", "drawn", "digit", "digits", "numeral", "ink", "pen", "an", "a", "the")


def caption(label: int, template: str) -> str:
    """Fill one template for digit `label`."""
    return template.format(w=NUMBER_WORDS[label], d=str(label))


def random_caption(label: int, rng: random.Random) -> str:
    """A caption for `label` from a random template."""
    return caption(label, rng.choice(TEMPLATES))


def prompt_for(label: int) -> str:
    """The canonical text-to-image prompt for digit `label`."""
    return caption(label, TEMPLATES[0])


def all_caption_texts() -> list[str]:
    """Every caption the templates can produce, plus the extra words: the tokenizer's corpus."""
    texts = [caption(label, t) for label in range(10) for t in TEMPLATES]
    return texts + [" ".join(EXTRA_WORDS)]
