"""The up-front dataset check: each broken YOLO dataset is read correctly or refused with
one line naming the file; the cache skips unchanged files; the check-data command."""

import os
import shutil

import numpy as np
import pytest
import torch

from stable_dfl.__main__ import main
from stable_dfl.data import (
    SHAPE_CLASSES,
    DatasetError,
    SyntheticShapes,
    YoloDataset,
    YoloFormatError,
    check_dataset,
    read_image,
    write_yolo_dataset,
)

TRAIN_IMAGES, VAL_IMAGES = 4, 2


def _dataset(root, image_format="npy"):
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        data = SyntheticShapes(count, 32, split, seed=3)
        write_yolo_dataset(data, root, split, SHAPE_CLASSES, image_format)
    return root


def _train_boxes():
    return sum(len(a) for a in SyntheticShapes(TRAIN_IMAGES, 32, "train", seed=3).annotations)


def _refusal(root, **kwargs):
    with pytest.raises(DatasetError) as error:
        check_dataset(root, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_valid_dataset_is_counted_and_builds_the_same_dataset(tmp_path):
    root = _dataset(tmp_path)
    lines = []
    check = check_dataset(root, progress=lines.append)
    train = check.splits["train"]
    synthetic = SyntheticShapes(TRAIN_IMAGES, 32, "train", seed=3)
    labels = torch.cat([a[:, 0] for a in synthetic.annotations]).long()
    assert check.class_names == SHAPE_CLASSES
    assert (train.images, train.boxes, train.empty_images) == (TRAIN_IMAGES, _train_boxes(), 0)
    assert train.boxes_per_class(5) == torch.bincount(labels, minlength=5).tolist()
    assert check.splits["val"].images == VAL_IMAGES and not train.problems
    assert lines[-2:] == [
        f"checking {root / 'images' / 'train'}: {TRAIN_IMAGES}/{TRAIN_IMAGES} images",
        f"checking {root / 'images' / 'val'}: {VAL_IMAGES}/{VAL_IMAGES} images",
    ]
    summary = "\n".join(check.summary_lines())
    assert f"train: {TRAIN_IMAGES} images, {_train_boxes()} boxes" in summary
    assert "circle" in summary

    built, direct = (
        YoloDataset.from_check(train, check.class_names, 32),
        YoloDataset(root, "train", image_size=32),
    )
    assert len(built) == len(direct) == TRAIN_IMAGES
    for i in range(TRAIN_IMAGES):
        assert torch.equal(built[i].labels, direct[i].labels)
        assert torch.equal(built[i].boxes, direct[i].boxes)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 0.5 0.5 0.2", "(5 fields), got 4"),
        ("0 0.5 0.5 0.2 0.2 0.9", "(5 fields), got 6"),
        ("0 0.5 x 0.2 0.2", "non-numeric"),
        ("0 nan 0.5 0.2 0.2", "NaN or infinite"),
        ("0 0.5 0.5 inf 0.2", "NaN or infinite"),
        ("0 1.2 0.5 0.2 0.2", "outside the image"),
        ("0 0.5 -0.3 0.2 0.2", "outside the image"),
        ("0 0.5 0.5 0 0.2", "empty"),
        ("0 0.5 0.5 0.2 -0.1", "empty"),
        ("5 0.5 0.5 0.2 0.2", "class 5 is not an id in [0, 4]: there are 5 class names"),
        ("-1 0.5 0.5 0.2 0.2", "class -1 is not an id"),
        ("1.5 0.5 0.5 0.2 0.2", "class 1.5 is not an integer id"),
        ("nan 0.5 0.5 0.2 0.2", "class nan is not an integer id"),
    ],
)
def test_a_bad_label_line_is_refused_or_dropped_and_counted(tmp_path, line, reason):
    root = _dataset(tmp_path)
    label = root / "labels" / "train" / "000001.txt"
    good_lines = label.read_text().count("\n")
    label.write_text(label.read_text() + line + "\n")
    message = _refusal(root)
    assert f"000001.txt:{good_lines + 1}: " in message and reason in message
    assert "1 problem(s)" in message and "--skip_bad_files" in message

    check = check_dataset(root, skip_bad=True)
    train = check.splits["train"]
    assert (train.images, train.boxes, train.skipped_lines) == (TRAIN_IMAGES, _train_boxes(), 1)
    assert len(train.problems) == 1
    assert str(train.problems[0]).startswith(f"{label}:{good_lines + 1}: ")
    assert reason in train.problems[0].message
    assert any("1 problems" in line for line in check.summary_lines())


def test_names_that_do_not_cover_the_label_ids_are_problems_per_line(tmp_path):
    root = _dataset(tmp_path)
    message = _refusal(root, class_names=["circle", "square"])
    assert "is not an id in [0, 1]: there are 2 class names" in message
    synthetic = SyntheticShapes(TRAIN_IMAGES, 32, "train", seed=3)
    labels = torch.cat([a[:, 0] for a in synthetic.annotations])
    check = check_dataset(root, ["train"], ["circle", "square"], skip_bad=True)
    train = check.splits["train"]
    assert len(train.problems) == train.skipped_lines == int((labels >= 2).sum())
    assert train.boxes == int((labels < 2).sum())


def test_a_label_file_with_a_byte_order_mark_reads_the_same(tmp_path):
    root = _dataset(tmp_path)
    before = check_dataset(root, cache=False).splits["train"].annotations
    label = root / "labels" / "train" / "000000.txt"
    label.write_bytes(b"\xef\xbb\xbf" + label.read_bytes())
    after = check_dataset(root, cache=False).splits["train"].annotations
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(YoloDataset(root, "train").annotations[0], before[0])


def test_a_latin1_label_file_is_refused_naming_it(tmp_path):
    root = _dataset(tmp_path)
    label = root / "labels" / "train" / "000002.txt"
    label.write_bytes("0 0.5 0.5 0.2 0.2 # café\n".encode("latin-1"))
    message = _refusal(root)
    assert "000002.txt: not UTF-8 text (byte 0xe9 at offset 23); save it as UTF-8" in message
    with pytest.raises(YoloFormatError, match=r"000002\.txt: not UTF-8 text"):
        YoloDataset(root, "train", image_size=32)
    train = check_dataset(root, skip_bad=True).splits["train"]
    assert train.images == TRAIN_IMAGES - 1 and train.skipped_images == 1
    assert root / "images" / "train" / "000002.npy" not in train.image_paths


@pytest.mark.parametrize(
    ("yaml_text", "reason"),
    [
        ("", "data.yaml: empty file"),
        ("- a\n- b\n", "data.yaml: expected a mapping with 'names', got a list"),
        ("names: {0: a, 2: c}\n", "data.yaml: names: no name for id 1"),
        ("names: {0: a, x: b}\n", "data.yaml: names: id 'x' is not a class id"),
        ("names: [a, b\n", "data.yaml: not valid YAML"),
        ("names: [a, a]\n", "given twice"),
        ("nc: 3\nnames: [a, b]\n", "nc is 3 but 'names' has 2 names"),
        ("path: .\n", "'names' must be a list or a mapping"),
    ],
)
def test_a_bad_data_yaml_is_refused_naming_it(tmp_path, yaml_text, reason):
    pytest.importorskip("yaml")
    root = _dataset(tmp_path)
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text(yaml_text)
    assert reason in _refusal(root)
    with pytest.raises(YoloFormatError, match=r"data\.yaml"):
        YoloDataset(root, "train", image_size=32)


def test_data_yaml_names_keep_their_ids(tmp_path):
    pytest.importorskip("yaml")
    root = _dataset(tmp_path)
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text(
        "names:\n  '1': square\n  0: circle\n  2: triangle \n  3: diamond\n  4: cross\n",
        encoding="utf-8-sig",
    )
    assert check_dataset(root).class_names == SHAPE_CLASSES


def test_class_names_are_stripped_and_a_bom_in_classes_txt_is_dropped(tmp_path):
    root = _dataset(tmp_path)
    (root / "classes.txt").write_bytes(
        b"\xef\xbb\xbf" + "".join(f" {n}\t\r\n" for n in SHAPE_CLASSES).encode() + b"\n\n"
    )
    assert check_dataset(root).class_names == SHAPE_CLASSES
    assert YoloDataset(root, "train").class_names == SHAPE_CLASSES
    spaced = "circle, square , triangle,diamond,  cross".split(",")
    assert check_dataset(root, class_names=spaced).class_names == SHAPE_CLASSES
    assert YoloDataset(root, "train", spaced).class_names == SHAPE_CLASSES


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        ("circle,,triangle,diamond,cross", "class 1 has an empty name"),
        ("circle,square,circle,diamond,cross", "'circle' is given twice (classes 0 and 2)"),
    ],
)
def test_empty_or_repeated_class_names_are_refused(tmp_path, names, reason):
    root = _dataset(tmp_path)
    assert reason in _refusal(root, class_names=names.split(","))
    (root / "classes.txt").write_text(names.replace(",", "\n"))
    assert reason in _refusal(root)


def test_a_missing_or_empty_split_is_refused(tmp_path):
    root = _dataset(tmp_path)
    shutil.rmtree(root / "images" / "val")
    assert f"no val split: {root / 'images' / 'val'} not found" in _refusal(root)
    for path in (root / "images" / "train").iterdir():
        path.unlink()
    (root / "images" / "train" / "a.bmp").write_bytes(b"BM")
    message = _refusal(root, splits=["train"])
    assert "empty train split" in message and "a.bmp" in message


def test_no_label_files_or_no_boxes_is_refused(tmp_path):
    root = _dataset(tmp_path)
    for label in (root / "labels" / "train").glob("*.txt"):
        label.write_text("")
    message = _refusal(root)
    assert f"{root / 'labels' / 'train'}: no boxes in {TRAIN_IMAGES} label files" in message
    assert "every image would be background" in message
    shutil.rmtree(root / "labels")
    message = _refusal(root)
    assert f"{root / 'labels' / 'train'}: no label files" in message
    assert "every image would be background" in message


def test_a_label_without_image_and_two_images_of_one_name_are_problems(tmp_path):
    root = _dataset(tmp_path)
    (root / "labels" / "train" / "orphan.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    np.save(root / "images" / "val" / "000000b.npy", np.zeros((8, 8, 3), np.uint8))
    shutil.copy(root / "images" / "val" / "000000b.npy", root / "images" / "val" / "000001.jpg")
    message = _refusal(root)
    assert "3 problem(s)" in message and "orphan.txt: no image orphan" in message
    val = check_dataset(root, skip_bad=True).splits["val"]
    assert {str(p.path.name): p.message.split(":")[0] for p in val.problems} == {
        "000001.jpg": "same name as 000001.npy",
        "000001.npy": "same name as 000001.jpg",
    }
    # 000000b.npy (no label file: background) is used; both images named 000001 are not.
    assert val.images == VAL_IMAGES and val.skipped_images == 2


def _png_dataset(tmp_path):
    pytest.importorskip("matplotlib")
    return _dataset(tmp_path, "png")


def test_a_0_byte_png_is_refused(tmp_path):
    root = _png_dataset(tmp_path)
    (root / "images" / "train" / "000001.png").write_bytes(b"")
    assert "000001.png: cannot read image: empty file (0 bytes)" in _refusal(root)


def test_a_truncated_png_is_refused(tmp_path):
    root = _png_dataset(tmp_path)
    image = root / "images" / "train" / "000003.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    assert "000003.png: cannot read image" in _refusal(root)
    with pytest.raises(YoloFormatError, match=r"000003\.png: cannot read image"):
        YoloDataset(root, "train")[3]


def test_a_text_file_named_jpg_is_refused_or_skipped(tmp_path):
    root = _png_dataset(tmp_path)
    (root / "images" / "train" / "notes.jpg").write_text("not an image\n")
    assert "notes.jpg: cannot read image" in _refusal(root)
    train = check_dataset(root, skip_bad=True).splits["train"]
    assert (train.images, train.skipped_images, len(train.problems)) == (TRAIN_IMAGES, 1, 1)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.array([{"pixels": 1}], dtype=object), "object array"),
        (np.zeros((3, 16, 16), np.uint8), "channels first (C x H x W); save H x W x C"),
        (
            np.full((16, 16, 3), 128.0, np.float32),
            "float pixels span [128, 128], expected [0, 1] (0-255?",
        ),
        (np.ones((16, 16, 3), bool), "pixels of type bool are not supported"),
        (np.full((16, 16, 3), np.nan, np.float32), "NaN or infinite pixels"),
        (np.zeros((16, 16, 5), np.uint8), "got shape (16, 16, 5)"),
    ],
)
def test_a_bad_npy_image_is_refused(tmp_path, array, reason):
    root = _dataset(tmp_path)
    path = root / "images" / "train" / "000002.npy"
    path.unlink()
    np.save(path, array, allow_pickle=True)
    message = _refusal(root)
    assert "000002.npy: " in message and reason in message
    with pytest.raises(YoloFormatError, match=r"000002\.npy: "):
        read_image(path)


def test_uint16_and_grey_images_are_scaled_not_clipped(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    np.save(tmp_path / "deep.npy", pixels)
    image = read_image(tmp_path / "deep.npy")
    assert image.shape == (3, 6, 7) and image.max() < 1.0
    assert torch.allclose(image, torch.from_numpy(pixels / 65535.0).permute(2, 0, 1).float())
    np.save(tmp_path / "grey.npy", pixels[..., 0])
    assert torch.equal(read_image(tmp_path / "grey.npy"), image[:1].expand(3, -1, -1))
    image_module = pytest.importorskip("PIL.Image")
    image_module.fromarray(pixels[..., 0]).save(tmp_path / "deep.png")
    png = read_image(tmp_path / "deep.png")
    assert png.shape == (3, 6, 7)
    assert torch.allclose(png[0], torch.from_numpy(pixels[..., 0] / 65535.0).float(), atol=1e-4)
    rgba = np.random.default_rng(1).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    image_module.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = torch.from_numpy(rgba[..., :3] / 255.0).permute(2, 0, 1).float()
    assert torch.allclose(read_image(tmp_path / "rgba.png"), expected, atol=1e-6)


def test_skipping_drops_and_counts_bad_files_and_lines(tmp_path):
    root = _dataset(tmp_path)
    (root / "images" / "train" / "000000.npy").write_bytes(b"")
    label = root / "labels" / "train" / "000003.txt"
    label.write_text(label.read_text() + "0 0.5\n")
    message = _refusal(root)
    assert "2 problem(s) in 2 file(s)" in message and "000000.npy" in message
    check = check_dataset(root, skip_bad=True)
    train = check.splits["train"]
    assert (train.images, train.skipped_images, train.skipped_lines) == (TRAIN_IMAGES - 1, 1, 1)
    assert {p.path.name for p in train.problems} == {"000000.npy", "000003.txt"}
    assert "  2 problems: skipped 1 images and 1 label lines" in check.summary_lines()
    assert len(YoloDataset.from_check(train, check.class_names)) == TRAIN_IMAGES - 1

    for image in (root / "images" / "train").iterdir():
        image.write_bytes(b"")
    assert "train split: all 4 images are bad" in _refusal(root, skip_bad=True)


def test_an_unchanged_dataset_is_checked_again_without_reading_an_image(tmp_path):
    root = _dataset(tmp_path)
    assert not check_dataset(root).cached
    assert (root / "labels" / "train.stable_dfl-check.json").is_file()
    assert check_dataset(root).cached
    # Same size and modification time: the cache is trusted, so garbage goes unseen,
    # which shows that no image was decoded.
    image = root / "images" / "train" / "000001.npy"
    stat = image.stat()
    image.write_bytes(b"x" * stat.st_size)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = check_dataset(root)
    assert again.cached and again.splits["train"].images == TRAIN_IMAGES
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "000001.npy: cannot read image" in _refusal(root)


def test_a_changed_label_file_or_class_count_is_rechecked(tmp_path):
    root = _dataset(tmp_path)
    check_dataset(root)
    label = root / "labels" / "train" / "000000.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    check = check_dataset(root)
    assert not check.cached and check.splits["train"].boxes == _train_boxes() + 1
    assert "there are 2 class names" in _refusal(root, class_names=["circle", "square"])


def test_a_damaged_cache_is_ignored_and_no_cache_writes_none(tmp_path):
    root = _dataset(tmp_path)
    cache = root / "labels" / "train.stable_dfl-check.json"
    check_dataset(root)
    cache.write_text('{"version": 1, "entries": {"000000.npy": {"image": 3}}}')
    assert not check_dataset(root).cached
    cache.write_text("not json")
    assert check_dataset(root).splits["train"].images == TRAIN_IMAGES
    cache.unlink()
    assert not check_dataset(root, cache=False).cached and not cache.exists()


def test_a_cache_that_cannot_be_written_is_skipped_silently(tmp_path):
    root = _dataset(tmp_path)
    # A folder where the cache file would go: writing it fails even for root.
    (root / "labels" / "train.stable_dfl-check.json").mkdir()
    assert not check_dataset(root).cached
    assert not check_dataset(root).cached


def test_a_read_only_dataset_is_checked_without_a_cache(tmp_path):
    root = _dataset(tmp_path)
    labels = root / "labels"
    labels.chmod(0o555)
    try:
        if os.access(labels, os.W_OK):
            pytest.skip("this user can write to a read-only folder")
        assert not check_dataset(root).cached
        assert not check_dataset(root).cached
        assert not (labels / "train.stable_dfl-check.json").exists()
    finally:
        labels.chmod(0o755)


def test_check_data_command_exit_codes_and_one_error_line(tmp_path, capsys):
    root = _dataset(tmp_path)
    assert main(["check-data", str(root)]) == 0
    out, err = capsys.readouterr()
    assert f"train: {TRAIN_IMAGES} images" in out and f"checking {root}" in out and not err

    label = root / "labels" / "val" / "000001.txt"
    label.write_text("0 0.5 0.5 0.2\n")
    assert main(["check-data", str(root)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "000001.txt:1: " in err and "Traceback" not in err

    assert main(["check-data", str(root), "--skip_bad_files", "--splits", "val"]) == 0
    out, _ = capsys.readouterr()
    assert f"{label}:1: expected 'class cx cy w h'" in out and "train:" not in out

    assert main(["check-data", str(root), "--names", "circle, square"]) == 2
    assert "there are 2 class names" in capsys.readouterr().err
    shutil.rmtree(root / "labels" / "train")
    assert main(["check-data", str(root), "--no_cache"]) == 2
    assert "no label files" in capsys.readouterr().err
