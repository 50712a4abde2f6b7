"""What the integration tests share: ultralytics, imported offline."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="session")
def ultralytics_loss(tmp_path_factory):
    """``ultralytics.utils.loss``, imported offline (YOLO_OFFLINE skips its DNS probe at import)
    with its settings file in a temporary folder, or a skip saying why."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("YOLO_OFFLINE", "1")
        env.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics_config")))
        try:
            return importlib.import_module("ultralytics.utils.loss")
        except ImportError as error:
            pytest.skip(f"ultralytics is not importable: {error}")
