"""stable_dfl.integrations.ultralytics.explain_step on a real ultralytics detector and batch:
a planted corrupt box (1e30 pixels) or NaN pixel is attributed to its image (named by ``im_file``), and the
batch's parts keep their boxes with ``batch_idx`` renumbered."""

from __future__ import annotations

import pytest
import torch

from stable_dfl.integrations import ultralytics as stable_ultralytics

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

BATCH, SIZE, CLASSES = 4, 64, 3
BAD_IMAGE = 2


@pytest.fixture
def detector_and_batch(ultralytics_loss):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=CLASSES, verbose=False).train()
    model.args = get_cfg(DEFAULT_CFG)
    counts = [2, 1, 3, 1]
    batch = {
        "img": torch.rand(BATCH, 3, SIZE, SIZE),
        "batch_idx": torch.repeat_interleave(torch.arange(BATCH), torch.tensor(counts)).float(),
        "cls": torch.randint(0, CLASSES, (sum(counts), 1)).float(),
        "bboxes": torch.rand(sum(counts), 4) * 0.3 + 0.3,
        "im_file": [f"images/{i}.jpg" for i in range(BATCH)],
    }
    return model, batch


def test_select_images_keeps_their_boxes_and_renumbers_them(detector_and_batch):
    _, batch = detector_and_batch
    images, part = stable_ultralytics.select_images(batch["img"], batch, [1, 2])
    assert torch.equal(images, batch["img"][[1, 2]]) and part["img"] is images
    assert part["batch_idx"].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert torch.equal(part["bboxes"], batch["bboxes"][2:6])
    assert part["im_file"] == ["images/1.jpg", "images/2.jpg"]


def test_a_corrupt_box_is_traced_to_its_image_file(detector_and_batch):
    model, batch = detector_and_batch
    rows = (batch["batch_idx"] == BAD_IMAGE).nonzero().flatten()
    batch["bboxes"][rows[0]] = torch.tensor([1e30, 1e30, 3e30, 3e30])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explanation = stable_ultralytics.explain_step(model, batch)
    assert explanation.origin.stage in ("loss", "backward")
    assert explanation.reproduced_by == [BAD_IMAGE]
    assert explanation.origin.verdict == "data"
    assert explanation.images[BAD_IMAGE]["name"] == f"images/{BAD_IMAGE}.jpg"
    assert explanation.images[BAD_IMAGE]["out_of_range_boxes"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_nan_pixel_is_the_data(detector_and_batch):
    model, batch = detector_and_batch
    batch["img"][1, 0, 5, 5] = float("nan")
    explanation = stable_ultralytics.explain_step(model, batch, autocast_dtype=torch.bfloat16)
    assert (explanation.origin.stage, explanation.reproduced_by) == ("input", [1])


def test_a_clean_batch_is_not_reproduced(detector_and_batch):
    model, batch = detector_and_batch
    explanation = stable_ultralytics.explain_step(model, batch)
    assert explanation.origin.stage == "none"
    assert set(explanation.losses) >= {"box_loss", "cls_loss", "dfl_loss", "total_loss"}
