"""The synthetic catalogue: deterministic, varied, and captions that state what is drawn."""

from collections import Counter

import pytest
from PIL import ImageChops

from fashioncap.synthetic import CATEGORIES, COLOURS, NEW_DESIGNS, catalogue, draw_product


def test_same_seed_same_products_other_seed_other_products():
    a, b = draw_product(5, 17, 64), draw_product(5, 17, 64)
    assert a.caption == b.caption and ImageChops.difference(a.image, b.image).getbbox() is None
    c = draw_product(6, 17, 64)
    assert ImageChops.difference(a.image, c.image).getbbox() is not None


def test_five_categories_with_four_or_more_attributes_each():
    products = list(catalogue(0, 500, 48))
    assert Counter(p.category for p in products) == {c: 100 for c in CATEGORIES}
    for category in CATEGORIES:
        sample = [p for p in products if p.category == category]
        assert len(sample[0].attributes) >= 4
        # every attribute takes several values across the catalogue
        for name in sample[0].attributes:
            assert len({p.attributes[name] for p in sample}) >= 2, (category, name)


def test_captions_name_the_drawn_colours():
    for p in catalogue(1, 200, 48):
        for name, value in p.attributes.items():
            if value in COLOURS and not (name == "pattern_colour" and p.attributes.get("pattern") == "plain"):
                assert value in p.caption.split(), (p.caption, name, value)


def test_captions_vary_enough_that_test_items_are_mostly_unseen():
    captions = [p.caption for p in catalogue(2, 3000, 32)]
    train, test = captions[:2500], captions[2500:]
    seen = set(train)
    assert sum(c in seen for c in test) / len(test) < 0.2


def test_position_and_background_vary_within_a_category():
    a, b = draw_product(3, 0, 64), draw_product(3, 5, 64)  # both watches
    assert a.category == b.category == "watch"
    assert a.image.getpixel((0, 0)) != b.image.getpixel((0, 0))
    assert a.image.getbbox() is not None and a.image.size == (64, 64)


def test_the_new_part_draws_only_designs_the_base_part_never_draws():
    base, new = list(catalogue(4, 3000, 24)), list(catalogue(4, 600, 24, part="new"))
    assert Counter(p.category for p in new) == {c: 200 for c in NEW_DESIGNS}
    for p in new:
        name, values = NEW_DESIGNS[p.category]
        assert p.attributes[name] in values, p
    for p in base:
        if p.category in NEW_DESIGNS:
            name, values = NEW_DESIGNS[p.category]
            assert p.attributes[name] not in values, p
    for category, (name, values) in NEW_DESIGNS.items():  # every new value is drawn
        assert {p.attributes[name] for p in new if p.category == category} == set(values)


def test_the_new_part_is_said_in_the_base_parts_words():
    """A model trained on the base part has every word the new part's captions use (its vocabulary is its
    training captions'), so adapting it needs no new tokens."""
    base_words = {w for p in catalogue(4, 3000, 24) for w in p.caption.split()}
    new_words = {w for p in catalogue(4, 600, 24, part="new") for w in p.caption.split()}
    assert new_words <= base_words, new_words - base_words
    assert any("checked" in p.caption and "t-shirt" in p.caption for p in catalogue(4, 6, 24, part="new"))


def test_a_new_item_is_another_product_than_the_base_item_of_its_index():
    for index in range(6):
        base, new = draw_product(5, index, 64), draw_product(5, index, 64, part="new")
        assert base.caption != new.caption and ImageChops.difference(base.image, new.image).getbbox() is not None
    a, b = draw_product(5, 3, 64, part="new"), draw_product(5, 3, 64, part="new")
    assert a.caption == b.caption and ImageChops.difference(a.image, b.image).getbbox() is None
    with pytest.raises(ValueError, match="a catalogue part is one of"):
        draw_product(5, 3, 64, part="next")
