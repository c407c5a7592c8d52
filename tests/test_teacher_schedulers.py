"""The teacher noises with the training forward process, whatever scheduler the model folder names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from teacher_helpers import tiny_sd, write_dataset

from lavender.records import read_records
from lavender.teacher.extract import ExtractionSettings, Teacher
from lavender.teacher.run import extract_targets
from lavender.teacher.store import open_store

# The inference schedulers SD-1.x folders ship. LMS needs scipy to be instantiated; the teacher
# only reads its config, so it must work without scipy too.
SCHEDULERS = (
    "PNDMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
)


def with_scheduler(tmp_path, class_name: str, **changes):
    """The tiny pipeline with only its scheduler folder changed (same weights, same betas)."""
    model = shutil.copytree(tiny_sd(), tmp_path / class_name)
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    # the config another scheduler class would write: its class name, the same betas
    path.write_text(json.dumps({**config, "_class_name": class_name, **changes}))
    return model


def test_stored_maps_do_not_depend_on_the_folders_scheduler_class(tmp_path):
    manifest = write_dataset(tmp_path / "data", 2)
    records = read_records(manifest)
    settings = ExtractionSettings(timesteps=(100, 500, 900), resolution=8)
    stores = {}
    for name in SCHEDULERS:
        teacher = Teacher(with_scheduler(tmp_path, name), settings)
        extract_targets(records, teacher, tmp_path / f"store-{name}", data=manifest, progress=False)
        store = open_store(tmp_path / f"store-{name}")
        stores[name] = {record_id: store.get(record_id) for record_id in store.ids()}
    reference = stores["PNDMScheduler"]
    assert set(reference) == {"r0", "r1"}
    differences = {
        name: max(float(np.abs(maps[record_id][key] - expected).max())
                  for record_id, words in reference.items() for key, expected in words.items())
        for name, maps in stores.items()
    }
    assert all(difference <= 2e-3 for difference in differences.values()), str(differences)


def test_timesteps_outside_the_training_range_are_refused(tmp_path):
    model = with_scheduler(tmp_path, "EulerDiscreteScheduler", num_train_timesteps=500)
    with pytest.raises(ValueError, match=r"--timesteps: 500 is outside 0\.\.499 \(the model was trained with num_train_timesteps=500\)"):
        Teacher(model, ExtractionSettings(timesteps=(100, 500)))
    with pytest.raises(ValueError, match=r"timesteps must be non-negative, got -1"):
        ExtractionSettings(timesteps=(-1, 100))
