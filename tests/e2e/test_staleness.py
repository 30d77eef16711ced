"""DVC's promise, end to end: a pipeline whose inputs changed is reported stale and re-runs."""

import csv
import json

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_prepare_reruns_when_a_catalogue_photo_or_the_code_it_imports_changes(tmp_path, tiny_raw):
    from PIL import Image

    from tests.conftest import BIN, clone_project, pending, sh

    shop = tmp_path / "shop"
    shop.mkdir()
    rows = []
    for i in range(40):
        Image.new("RGB", (48, 48), (6 * i, 255 - 6 * i, 90)).save(shop / f"p{i}.png")
        rows.append({"file_name": f"p{i}.png", "text": f"a product of colour number {i}"})
    with (shop / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "repo").mkdir()
    repo = clone_project(tmp_path / "repo")
    raw = {**tiny_raw, "data": {**tiny_raw["data"], "source": "imagefolder", "path": str(shop), "text_column": "text"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc = str(BIN / "dvc")
    sh([dvc, "repro", "prepare"], repo)

    def changed() -> dict:
        return pending(json.loads(sh([dvc, "status", "prepare", "--json"], repo).stdout))

    assert changed() == {}
    Image.new("RGB", (48, 48), "red").save(shop / "new.png")
    with (shop / "metadata.csv").open("a") as f:
        f.write("new.png,a red product\n")
    assert str(shop) in json.dumps(changed())  # a new photo in the catalogue: prepare is stale
    sh([dvc, "repro", "prepare"], repo)
    assert json.loads((repo / "metrics/prepare.json").read_text())["items"] == 41
    with (repo / "src/fashioncap/imaging.py").open("a") as f:
        f.write("\n# an edit\n")
    assert "src/fashioncap/imaging.py" in json.dumps(changed())  # code prepare runs: stale again
