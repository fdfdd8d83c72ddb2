"""Export a trained Beagle (a `beagle train` output folder) as the folder its Hub repository holds: weights cast to
bf16 in safetensors, without the target's embedding and head, the remote code and `custom_generate/`, and none of the
Trainer's files (`training_args.bin` is a pickle and never ships)."""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .card import BeagleCardError, card_images, read_beagle_config


def export_checkpoint(source: str | os.PathLike, destination: str | os.PathLike,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Load the Beagle at `source` (strictly), cast it to `dtype` and save it to `destination` (replaced atomically:
    written to a temporary sibling first). Returns the destination."""
    from modeling_beagle import BeagleModel

    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise BeagleCardError(f"{source}: a Beagle checkpoint folder (config.json, model.safetensors) expected, "
                              f"found no config.json.")
    check_replaceable(destination, source)
    model = BeagleModel.from_pretrained(source)
    if model.config.carry_target_embeddings:
        raise BeagleCardError(f"{source}: carry_target_embeddings expected False for a Hub export (the target's "
                              f"embedding and head are loaded from the target), found True.")
    model.to(dtype)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".export-") as tmp:
        staging = Path(tmp) / "checkpoint"
        model.save_pretrained(staging)
        if destination.exists():
            for name in card_files(destination):  # an existing card stays until `beagle card` rewrites it
                shutil.copy2(destination / name, staging / name)
            shutil.rmtree(destination)
        os.replace(staging, destination)
    return destination


def check_replaceable(destination: Path, source: Path) -> None:
    """Refuse a destination whose replacement would delete more than an earlier export. It must be missing, empty, or
    a Beagle checkpoint folder (`read_beagle_config`; the source itself too) that holds no folder but
    `custom_generate/` and does not hold the source."""
    if not destination.exists():
        return
    if not destination.is_dir():
        raise BeagleCardError(f"{destination}: the export's destination expected a folder, found a file.")
    entries = sorted(entry.name for entry in destination.iterdir())
    if not entries:
        return
    if destination.resolve() in source.resolve().parents:
        raise BeagleCardError(f"{destination}: the export's destination holds the source {source}, and replacing it "
                              f"would delete it: choose a new or empty folder.")
    try:
        read_beagle_config(destination)
        is_beagle = True
    except BeagleCardError:
        is_beagle = False
    folders = [name for name in entries if (destination / name).is_dir() and name != "custom_generate"]
    if not is_beagle or folders:
        found = f"the folders {folders}" if is_beagle else f"{entries[:8]} and no Beagle config.json"
        raise BeagleCardError(f"{destination}: the export replaces its destination, which expected to be missing, "
                              f"empty or an earlier Beagle export, found {found}: nothing was deleted; choose a new "
                              f"or empty folder.")


def card_files(folder: Path) -> list[str]:
    """The model card of a checkpoint folder and the local images it shows, where they exist: what an export into
    that folder keeps, so the card is not left pointing at deleted plots."""
    if not (folder / "README.md").is_file():
        return []
    return ["README.md", *card_images(folder / "README.md")]
