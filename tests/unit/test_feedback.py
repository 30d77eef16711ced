"""Reviewers' corrections: every line is checked first and nothing is applied unless all pass; what is applied
reaches the prepared training data."""

import io
import json

import pytest
from PIL import Image

from fashioncap import feedback
from fashioncap.feedback import FeedbackError, apply, check, stored

KEYS = {"synthetic-000001", "synthetic-000002", "synthetic-000003"}


def png(path, size=(64, 64), colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path.name


def lines(*entries) -> list[str]:
    return [e if isinstance(e, str) else json.dumps(e) for e in entries]


def test_a_file_with_bad_lines_applies_nothing_and_names_each_line(tmp_path, tiny_params):
    png(tmp_path / "new.png")
    png(tmp_path / "tiny.png", size=(8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    bad = lines({"key": "synthetic-000001", "caption": "a red bag with a gold clasp"},  # good
                {"key": "no-such-product", "caption": "a watch"},
                {"key": "synthetic-000002", "caption": "   "},
                {"key": "synthetic-000003", "caption": " ".join(["word"] * (tiny_params.data.max_caption_words + 1))},
                {"image": "missing.png", "caption": "a bag"},
                {"image": "broken.png", "caption": "a bag"},
                {"image": "tiny.png", "caption": "a bag"},
                {"key": "synthetic-000001", "caption": "again"},
                {"key": "synthetic-000002", "image": "new.png", "caption": "both"},
                "[1, 2]", "{not json", {"key": "synthetic-000003", "caption": "x", "price": 3})
    with pytest.raises(FeedbackError) as refused:
        check(bad, tmp_path, KEYS, tiny_params.data)
    said = str(refused.value).splitlines()
    assert said[0] == "11 bad line(s); nothing was applied:"
    assert said[1:] == [
        "line 2: unknown key 'no-such-product': no product of the prepared catalogue has it",
        "line 3: empty or missing caption",
        f"line 4: caption of {tiny_params.data.max_caption_words + 1} words (limit data.max_caption_words "
        f"{tiny_params.data.max_caption_words})",
        f"line 5: cannot read image '{tmp_path / 'missing.png'}': No such file or directory",
        said[5],  # the decoder's own words for a broken PNG
        f"line 7: image '{tmp_path / 'tiny.png'}' of 8x8 pixels is below data.min_image_side "
        f"({tiny_params.data.min_image_side})",
        "line 8: 'synthetic-000001' is corrected again (first on line 1)",
        'line 9: needs either "key" (a product of the catalogue) or "image" (a new photo\'s path)',
        "line 10: not a JSON object",
        "line 11: not JSON (Expecting property name enclosed in double quotes)",
        "line 12: unknown field(s) ['price']"]
    assert said[5].startswith(f"line 6: image '{tmp_path / 'broken.png'}': ")
    assert stored(tmp_path / "corrections") == {}  # check() alone writes nothing; the command applies only after it


def test_corrections_merge_and_a_worklist_line_is_one(tmp_path, tiny_params):
    png(tmp_path / "new.png")
    worklist = {"key": "synthetic-000002", "caption": "a blue watch", "confidence": -1.2, "split": "test",
                "catalogue_caption": "a watch", "photo": "photos/synthetic-000002.png"}
    first = check(lines(worklist, {"image": "new.png", "caption": "a red cap"}), tmp_path, KEYS, tiny_params.data)
    assert apply(first, tmp_path / "corrections") == {"captions": 1, "photos": 1, "stored": 2}
    later = check(lines({"key": "synthetic-000002", "caption": "a navy watch"}), tmp_path, KEYS, tiny_params.data)
    apply(later, tmp_path / "corrections")
    kept = stored(tmp_path / "corrections")
    assert kept["synthetic-000002"]["caption"] == "a navy watch"  # the newer correction of a key wins
    photo = next(k for k in kept if k.startswith("photo-"))
    assert kept[photo]["caption"] == "a red cap"
    assert (tmp_path / "corrections" / feedback.REVIEWED / kept[photo]["photo"]).read_bytes() == \
        (tmp_path / "new.png").read_bytes()
