"""``train --data`` on a YOLO dataset with one thing broken at a time: each is either trained
on correctly or refused before training with one ``error:`` line naming what is wrong, exit
code 2 and no checkpoint."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stable_dfl.data import SHAPE_CLASSES, SyntheticShapes, write_yolo_dataset
from stable_dfl.train import load_checkpoint
from stable_dfl.train.cli import main as train_main

from ..support.runs import cli_args

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TRAIN_IMAGES, VAL_IMAGES = 8, 4


def _dataset(root: Path, image_format: str = "png") -> Path:
    for split, count in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        data = SyntheticShapes(count, 32, split, seed=5)
        write_yolo_dataset(data, root, split, SHAPE_CLASSES, image_format)
    return root


def _train(root: Path, save_dir: Path, *extra: str) -> int:
    # The synthetic counts are ignored under --data; the dataset's own sizes are used.
    return train_main([*cli_args(save_dir), "--data", str(root), *extra])


def _first(root: Path, kind: str, split: str = "train") -> Path:
    folder = root / ("images" if kind == "image" else "labels") / split
    return sorted(folder.iterdir())[0]


def _append_line(line: str):
    def breaks(root: Path) -> Path:
        label = _first(root, "label")
        label.write_text(label.read_text() + line + "\n")
        return label

    return breaks


def _latin1_label(root: Path) -> Path:
    label = _first(root, "label")
    label.write_bytes(b"# caf\xe9\n" + label.read_bytes())
    return label


def _empty_data_yaml(root: Path) -> Path:
    pytest.importorskip("yaml")
    (root / "classes.txt").unlink()  # classes.txt, when present, names the classes
    (root / "data.yaml").write_text("")
    return root / "data.yaml"


def _names_with_a_gap(root: Path) -> Path:
    pytest.importorskip("yaml")
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text("names: {0: circle, 2: triangle}\n")
    return root / "data.yaml"


def _no_val_split(root: Path) -> Path:
    shutil.rmtree(root / "images" / "val")
    shutil.rmtree(root / "labels" / "val")
    return root / "images" / "val"


def _empty_train_split(root: Path) -> Path:
    for path in (root / "images" / "train").iterdir():
        path.unlink()
    return root / "images" / "train"


def _no_labels_folder(root: Path) -> Path:
    shutil.rmtree(root / "labels")
    return root / "labels"


def _zero_byte_png(root: Path) -> Path:
    image = _first(root, "image")
    image.write_bytes(b"")
    return image


def _truncated_png(root: Path) -> Path:
    image = _first(root, "image", "val")
    image.write_bytes(image.read_bytes()[:-200])
    return image


def _truncated_jpeg(root: Path) -> Path:
    image = _first(root, "image")
    jpeg = image.with_suffix(".jpg")
    buffer = io.BytesIO()
    Image.open(image).convert("RGB").save(buffer, "JPEG")
    jpeg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    image.unlink()
    return jpeg


def _text_named_jpg(root: Path) -> Path:
    image = _first(root, "image")
    jpeg = image.with_suffix(".jpg")
    jpeg.write_text("not an image")
    image.unlink()
    return jpeg


def _npy_object_array(root: Path) -> Path:
    image = _first(root, "image")
    array = image.with_suffix(".npy")
    np.save(array, np.array([None, "x"], dtype=object), allow_pickle=True)
    image.unlink()
    return array


REFUSED = {
    "4 fields": (_append_line("0 0.5 0.5 0.2"), "got 4"),
    "non-numeric": (_append_line("0 0.5 x 0.2 0.2"), "non-numeric"),
    "NaN coordinate": (_append_line("0 nan 0.5 0.2 0.2"), "NaN or infinite"),
    "outside the image": (_append_line("0 1.2 0.5 0.2 0.2"), "outside the image"),
    "zero size": (_append_line("0 0.5 0.5 0 0.2"), "empty"),
    "class out of range": (_append_line("7 0.5 0.5 0.2 0.2"), "class 7 is not an id"),
    "class 1.5": (_append_line("1.5 0.5 0.5 0.2 0.2"), "not an integer id"),
    "latin-1 label file": (_latin1_label, "UTF-8"),
    "empty data.yaml": (_empty_data_yaml, "empty file"),
    "names with a gap": (_names_with_a_gap, "no name for id 1"),
    "no val split": (_no_val_split, "val"),
    "empty train split": (_empty_train_split, "train"),
    "no labels folder": (_no_labels_folder, "no label files"),
    "0-byte png": (_zero_byte_png, ""),
    "truncated png": (_truncated_png, ""),
    "truncated jpeg": (_truncated_jpeg, ""),
    "text named .jpg": (_text_named_jpg, ""),
    "npy object array": (_npy_object_array, ""),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_broken_dataset_is_refused_before_training(case, tmp_path, capsys):
    breaks, reason = REFUSED[case]
    root = _dataset(tmp_path / "data")
    culprit = breaks(root)
    assert _train(root, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and reason in err
    assert culprit.name in err, "the message names the file or folder at fault"
    assert not list((tmp_path / "run").glob("*.pt")), "no checkpoint from a refused dataset"


def test_too_few_names_are_refused(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    assert _train(root, tmp_path / "run", "--names", "circle,square") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "there are 2 class names" in err


def test_a_bad_label_line_is_skipped_and_counted_only_when_asked(tmp_path, capsys):
    root = _dataset(tmp_path / "data")
    label = _append_line("0 0.5 0.5 0.2")(root)
    assert _train(root, tmp_path / "run", "--skip_bad_files") == 0
    out = capsys.readouterr().out
    assert f"{label}:" in out and "1 problems" in out
    assert (tmp_path / "run" / "last.pt").is_file()


def test_byte_order_marks_spaced_names_and_16_bit_images_train_correctly(tmp_path):
    root = _dataset(tmp_path / "data", image_format="npy")
    label = _first(root, "label")
    label.write_bytes(b"\xef\xbb\xbf" + label.read_bytes())
    for path in (root / "images" / "train").iterdir():
        image = np.load(path)
        np.save(path, (image.astype(np.float64) * 65535 / 255).round().astype(np.uint16))
    names = ", ".join(SHAPE_CLASSES)
    assert _train(root, tmp_path / "run", "--names", names) == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert tuple(checkpoint["class_names"]) == SHAPE_CLASSES
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )
