import numpy as np
import pytest
import torch

from stable_dfl.data import (
    PadToFixedBoxes,
    SyntheticShapes,
    YoloDataset,
    YoloFormatError,
    write_yolo_dataset,
)


def test_synthetic_set_is_deterministic_and_index_stable():
    a = SyntheticShapes(6, 64, "train", seed=1)
    b = SyntheticShapes(3, 64, "train", seed=1)
    assert torch.equal(a.images[:3], b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.annotations[:3], b.annotations, strict=False))
    assert not torch.equal(SyntheticShapes(3, 64, "val", seed=1).images, b.images)
    assert not torch.equal(SyntheticShapes(3, 64, "train", seed=2).images, b.images)


def test_synthetic_boxes_are_valid():
    data = SyntheticShapes(20, 64, seed=0)
    for i in range(len(data)):
        sample = data[i]
        assert (
            sample.image.shape == (3, 64, 64)
            and 0 <= sample.image.min()
            and sample.image.max() <= 1
        )
        assert 1 <= len(sample.labels) <= data.max_objects
        assert ((sample.labels >= 0) & (sample.labels < len(data.class_names))).all()
        boxes = sample.boxes
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 8).all()


def test_padding_gives_fixed_shapes():
    data = SyntheticShapes(4, 64)
    batch = PadToFixedBoxes(6)([data[i] for i in range(4)])
    assert batch.images.shape == (4, 3, 64, 64)
    assert (
        batch.labels.shape == (4, 6)
        and batch.boxes.shape == (4, 6, 4)
        and batch.valid.shape == (4, 6)
    )
    assert batch.valid.sum() == sum(len(data[i].labels) for i in range(4))
    with pytest.raises(ValueError, match="max_objects"):
        PadToFixedBoxes(0)([data[0]])


@pytest.mark.parametrize("image_format", ["npy", "png"])
def test_written_yolo_set_reads_back(tmp_path, image_format):
    if image_format == "png":
        pytest.importorskip("matplotlib")
    data = SyntheticShapes(4, 64, seed=5)
    write_yolo_dataset(data, tmp_path, "train", data.class_names, image_format)
    assert (tmp_path / "classes.txt").read_text().split() == list(data.class_names)
    read = YoloDataset(tmp_path, "train", image_size=64)
    assert read.class_names == data.class_names and len(read) == 4
    for i in range(4):
        original, loaded = data[i], read[i]
        assert torch.equal(original.labels, loaded.labels)
        assert torch.allclose(original.boxes, loaded.boxes, atol=1e-3)
        assert torch.allclose(original.image, loaded.image, atol=1 / 255)


def _yolo_root(tmp_path, label_text, names=("a", "b")):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "images" / "img.npy", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "labels" / "img.txt").write_text(label_text)
    (tmp_path / "classes.txt").write_text("\n".join(names))
    return tmp_path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "5 fields"),
        ("0 0.5 x 0.2 0.2", "non-numeric"),
        ("2 0.5 0.5 0.2 0.2", "class 2"),
        ("0.5 0.5 0.5 0.2 0.2", "class 0.5"),
        ("0 0.95 0.5 0.2 0.2", "outside the image"),
        ("0 0.5 0.5 0 0.2", "empty"),
    ],
)
def test_malformed_label_line_names_file_and_line(tmp_path, line, message):
    root = _yolo_root(tmp_path, f"1 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(YoloFormatError, match=message) as error:
        YoloDataset(root)
    assert "img.txt:2:" in str(error.value)


def test_lenient_mode_skips_bad_lines_with_one_warning(tmp_path):
    root = _yolo_root(tmp_path, "1 0.5 0.5 0.2 0.2\n0 0.5\n7 0.5 0.5 0.1 0.1\n")
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        data = YoloDataset(root, strict=False)
    assert data.skipped_lines == 2
    assert data[0].labels.tolist() == [1]


def test_label_without_image_and_missing_names_are_errors(tmp_path):
    root = _yolo_root(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(YoloFormatError, match=r"orphan\.txt: no image orphan"):
        YoloDataset(root)
    (root / "labels" / "orphan.txt").unlink()
    (root / "classes.txt").unlink()
    with pytest.raises(YoloFormatError, match="no class names"):
        YoloDataset(root)
    assert YoloDataset(root, class_names=["a"]).class_names == ("a",)


def test_image_without_label_file_has_no_objects(tmp_path):
    root = _yolo_root(tmp_path, "")
    np.save(root / "images" / "empty.npy", np.zeros((8, 8, 3), np.uint8))
    data = YoloDataset(root, image_size=32)
    assert [len(data[i].labels) for i in range(len(data))] == [0, 0]
