"""The demo set: fixed, disjoint splits of labelled monocrystalline cells."""

from __future__ import annotations

import pytest

from padim_core import demo


def _label(path) -> float:
    return {cell.path: cell.probability for cell in demo.read_labels()}[path]


def test_the_splits_have_their_sizes_and_labels():
    good, defective = demo.validation_images()
    assert len(demo.train_images()) == demo.N_TRAIN
    assert (len(good), len(defective)) == (40, 40)
    assert {_label(p) for p in demo.train_images() + good} == {0.0}
    assert {_label(p) for p in defective} == {1.0}


def test_the_splits_are_disjoint_and_exist():
    good, defective = demo.validation_images()
    splits = [
        demo.train_images(),
        good,
        defective,
        demo.inspection_images(),
        demo.batch_images(),
    ]
    every = [path for split in splits for path in split]
    assert len(every) == len(set(every))
    assert all(path.is_file() for path in every)


def test_only_monocrystalline_cells_are_used():
    types = {cell.path: cell.cell_type for cell in demo.read_labels()}
    assert {types[p] for p in demo.batch_images()} == {"mono"}


def test_a_smaller_training_set_is_a_prefix():
    assert demo.train_images(5) == demo.train_images()[:5]
    with pytest.raises(ValueError, match="choose 1 to"):
        demo.train_images(0)
