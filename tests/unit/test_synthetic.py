"""The synthetic catalogue: deterministic, varied, and captions that state what is drawn."""

from collections import Counter

from PIL import ImageChops

from fashioncap.synthetic import CATEGORIES, COLOURS, catalogue, draw_product


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
