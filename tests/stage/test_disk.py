"""Free-space preflights: a stage that would fill the disk stops before writing, saying what it needs."""

from pathlib import Path

import pytest

from fashioncap import disk
from tests.conftest import train_outputs


def test_training_needs_two_best_models_and_two_full_states_at_its_peak():
    blip_base = 223_971_644
    assert disk.training_bytes(blip_base, blip_base, checkpoints=True) == pytest.approx(7.2e9, rel=0.01)
    assert disk.training_bytes(blip_base, blip_base, checkpoints=False) == 8 * blip_base
    frozen_vision = disk.training_bytes(blip_base, 137_000_000, checkpoints=True)
    assert frozen_vision < disk.training_bytes(blip_base, blip_base, checkpoints=True)


def test_require_names_the_need_the_free_space_and_the_clean_up(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda path: 2_000_000_000)
    disk.require(tmp_path / "not" / "there" / "yet", 1_000_000_000, "training")
    with pytest.raises(disk.DiskSpaceError, match=r"training needs about 7\.2 GB free .* only 2\.0 GB is free.*dvc gc"):
        disk.require(tmp_path, 7_200_000_000, "training")


def test_free_bytes_measures_the_nearest_existing_folder(tmp_path, monkeypatch):
    # which folder is measured, not how much is free: other processes (parallel test workers) write meanwhile
    import shutil

    measured, real = [], shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: measured.append(Path(path)) or real(path))
    assert disk.free_bytes(tmp_path / "a" / "b") > 0
    assert measured == [tmp_path.resolve()]


def test_prepare_stops_before_replacing_its_output_when_the_disk_is_full(tmp_path, monkeypatch, tiny_params):
    from fashioncap import prepare

    rows, rejected = prepare.build_splits(tiny_params)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "earlier.txt").write_text("the previous output")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 1000)
    with pytest.raises(disk.DiskSpaceError, match="the prepared dataset"):
        prepare.save(rows, rejected, out, {"p50": 1})
    assert (out / "earlier.txt").read_text() == "the previous output"


def test_train_stops_before_the_first_step_when_checkpoints_would_not_fit(tmp_path, monkeypatch, tiny_params, tiny_model):
    from fashioncap import train

    _, data_dir = tiny_model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10_000)
    out = train_outputs(tmp_path / "checkpoints")
    with pytest.raises(disk.DiskSpaceError, match=r"training 0\.\d\dM parameters \(best model and full-state checkpoints\)"):
        train.train(tiny_params, data_dir, out)
    assert not (tmp_path / "checkpoints" / "run.json").exists() and not (tmp_path / "checkpoints" / "ckpt").exists()
