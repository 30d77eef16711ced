"""Behavioural tests of a trained captioner (in Made-With-ML's sense), on products drawn beyond the
training catalogue, one factor changed at a time:

- invariance: the same product on another background, or saved as a JPEG, is described the same way;
- directional: the same product with one attribute changed (a watch's strap colour, a t-shirt's colour)
  is described with the new colour.

The model is the offline recipe, shrunk to train in about a minute on two CPU cores (48 px input,
800 steps; 94 s for this measurement's training and captioning on a 2-core AMD EPYC without AVX-512).
It runs in the test's process with the CPU's own kernels, so its rates differ by CPU. Measured (main colour
named / category and main colour kept on a flat grey backdrop / kept as JPEGs of quality 60 / a changed colour
named, over 40 unseen products each), 2026-12-08, commit fbc5d82 (the scratch encoder's grid positions):

| CPU | watch | t-shirt |
|---|---|---|
| 2-core AMD EPYC without AVX-512 (family 25 model 1) | 0.70 / 0.88 / 1.00 / 0.70 | 0.65 / 0.90 / 1.00 / 0.75 |

(Whole captions are less stable: 38% of the watches' and 50% of the t-shirts' were word for word the same on
the grey backdrop, which the training backdrops, soft gradients, never were. At 400 steps the t-shirt's main
colour fell to 0.45, under its threshold, so the recipe keeps 800.) The thresholds (0.5 / 0.7 / 0.7 / 0.55)
sit below every rate measured, the closest by 0.15 (the t-shirt's main colour, the watch's changed colour),
and far above what a model that ignored the picture would reach: a constant caption passes every invariance
test but names the new colour in about 1 case in 9, and the directional tests catch it.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import pytest

from fashioncap.synthetic import CATEGORIES, COLOURS, draw_product

pytestmark = pytest.mark.slow  # trains a model for about a minute

ITEMS = 4000  # the training catalogue; the tested products are drawn after it, so none was seen
PRODUCTS = 40  # tested per category

# the offline recipe at a size that trains in about a minute on two CPU cores
RECIPE = ["profile=offline", f"data.synthetic.items={ITEMS}", "data.synthetic.render_size=192", "model.image_size=48",
          "train.lr=0.002", "train.max_steps=800", "train.eval_every=800", "train.checkpoint_every=800",
          "train.eval_samples=64", "train.num_workers=0", "train.log_every=100", "evaluate.table_images=0"]


@dataclass
class Captioner:
    model: object
    processor: object
    params: object

    def __call__(self, images) -> list[str]:
        from fashioncap.imaging import to_model_image
        from fashioncap.modeling import caption_all

        size = self.params.model.image_size
        captions = caption_all(self.model, self.processor, [to_model_image(i, size) for i in images],
                               self.params.generate, quiet=True)
        return [c.lower() for c in captions]


@pytest.fixture(scope="session")
def captioner(tmp_path_factory) -> Captioner:
    """The recipe above, prepared and trained by the stages' own functions in this process."""
    from pytest import MonkeyPatch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from fashioncap.config import parse_params
    from fashioncap.prepare import build_splits, save, token_lengths
    from fashioncap.train import train
    from tests.conftest import compose, train_outputs

    root = tmp_path_factory.mktemp("behaviour")
    params = parse_params(compose(RECIPE))
    rows, rejected = build_splits(params)
    save(rows, rejected, root / "prepared", token_lengths(params.model, rows))
    with MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        train(params, root / "prepared", train_outputs(root))
    best = root / "best"
    return Captioner(BlipForConditionalGeneration.from_pretrained(best).eval(), BlipProcessor.from_pretrained(best),
                     params)


def unseen(category: str) -> list[int]:
    """Indexes of PRODUCTS products of a category that come after the training catalogue."""
    first = ITEMS + (CATEGORIES.index(category) - ITEMS) % len(CATEGORIES)
    return [first + len(CATEGORIES) * k for k in range(PRODUCTS)]


def drawn(index: int, **kwargs):
    return draw_product(42, index, 192, **kwargs)


def main_colour(category: str, caption: str) -> str | None:
    """The colour a caption gives the product's main part: the strap of a watch ("a watch with red ..."),
    the body of a t-shirt ("a red short sleeve t-shirt ...")."""
    words = caption.split()
    if category == "watch" and words[:3] == ["a", "watch", "with"] and len(words) > 3:
        return words[3]
    if category == "t-shirt" and "t-shirt" in words and len(words) > 1:
        return words[1]
    return None


MAIN = {"watch": "strap_colour", "t-shirt": "colour"}


def rate(hits) -> float:
    hits = list(hits)
    return sum(hits) / len(hits)


def as_jpeg(image, quality: int):
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("category", ["watch", "t-shirt"])
def test_the_model_names_the_main_colour_of_unseen_products(captioner, category):
    """The premise of the tests below: the model reads the colour from the picture."""
    products = [drawn(i) for i in unseen(category)]
    said = [main_colour(category, c) for c in captioner([p.image for p in products])]
    assert rate(s == p.attributes[MAIN[category]] for s, p in zip(said, products)) >= 0.5


@pytest.mark.parametrize("category", ["watch", "t-shirt"])
@pytest.mark.parametrize("change", ["grey backdrop", "jpeg quality 60"])
def test_invariance_background_and_compression_leave_the_description_alone(captioner, category, change):
    indexes = unseen(category)
    before = captioner([drawn(i).image for i in indexes])
    if change == "grey backdrop":
        after = captioner([drawn(i, backdrop=(215, 215, 215)).image for i in indexes])
    else:
        after = captioner([as_jpeg(drawn(i).image, 60) for i in indexes])
    same = rate(main_colour(category, a) == main_colour(category, b) and a.split()[:2] == b.split()[:2]
                for a, b in zip(before, after))
    assert same >= 0.7, list(zip(before, after))


@pytest.mark.parametrize("category", ["watch", "t-shirt"])
def test_directional_a_new_main_colour_is_named_in_the_caption(captioner, category):
    rng = random.Random(0)
    indexes, changes = unseen(category), []
    for i in indexes:
        attributes = drawn(i).attributes
        taken = {attributes[k] for k in attributes if k != MAIN[category]}  # stays visible against the rest
        changes.append(rng.choice([c for c in COLOURS if c != attributes[MAIN[category]] and c not in taken]))
    after = captioner([drawn(i, changes={MAIN[category]: c}).image for i, c in zip(indexes, changes)])
    followed = rate(main_colour(category, caption) == colour for caption, colour in zip(after, changes))
    assert followed >= 0.55, list(zip(changes, after))


def test_products_drawn_for_the_tests_are_not_in_the_training_catalogue():
    for category in ("watch", "t-shirt"):
        indexes = unseen(category)
        assert len(indexes) == PRODUCTS and min(indexes) >= ITEMS
        assert {drawn(i).category for i in indexes} == {category}


def test_one_factor_changes_at_a_time():
    base = drawn(unseen("watch")[0])
    moved = drawn(unseen("watch")[0], changes={"strap_colour": "green" if base.attributes["strap_colour"] != "green"
                                                else "red"})
    assert {k for k in base.attributes if base.attributes[k] != moved.attributes[k]} == {"strap_colour"}
    flat = drawn(unseen("watch")[0], backdrop=(215, 215, 215))
    assert flat.caption == base.caption and flat.image.getpixel((0, 0)) == (215, 215, 215)
    changed = sum(a != b for a, b in zip(base.image.getdata(), flat.image.getdata()))
    assert 0 < changed < 192 * 192  # the backdrop changed, the product did not move
    with pytest.raises(ValueError, match="no attribute"):
        drawn(unseen("watch")[0], changes={"sleeves": "long"})
