"""The names of an exported diffusers folder, and how dkdm recognises one (no diffusers import:
teachers/spec.py asks this of every folder it is given).

  model_index.json        _class_name ["pipeline_dkdm", "DKDMPipeline"]
  pipeline_dkdm.py
  unet/ | transformer/    config.json, dkdm_models.py, diffusion_pytorch_model.safetensors (a dkdm
                          model file too: its header holds dkdm's document)
  scheduler/              scheduler_config.json, scheduling_dkdm.py
  vae/                    latent students: the teacher's autoencoder (config.json, weights)
  README.md               the model card
"""

from __future__ import annotations

import json
from pathlib import Path

PIPELINE_CLASS = ("pipeline_dkdm", "DKDMPipeline")
MODEL_FOLDERS = {"unet": "DKDMUNet", "transformer": "DKDMDiT"}  # folder -> class in dkdm_models.py
WEIGHTS = "diffusion_pytorch_model.safetensors"
AUTOENCODER = "vae"


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` is a dkdm diffusers export (its model_index.json names DKDMPipeline)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and tuple(doc.get("_class_name") or ()) == PIPELINE_CLASS


def model_folder(folder: Path) -> Path | None:
    """The export's model component folder (unet/ or transformer/), if it has one."""
    for name in MODEL_FOLDERS:
        if (Path(folder) / name / WEIGHTS).is_file():
            return Path(folder) / name
    return None
