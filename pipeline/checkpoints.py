"""Training checkpoints that exist whole or not at all: `step-XXXXXXXX/` under a run's
`checkpoints/`, written as `.partial` and renamed; the newest `keep` are kept."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"  # step, history, optimizer, schedule and RNG state (torch.save)


def save_checkpoint(out_dir: Path, step: int, write_weights: Callable[[Path], None], state: dict, keep: int) -> Path:
    import torch

    final = Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(partial)  # safetensors
    torch.save({"step": step, **state}, partial / STATE_FILE)
    partial.rename(final)
    for old in sorted((Path(out_dir) / CHECKPOINTS).glob("step-*[0-9]"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest whole checkpoint; a save that a kill interrupted is removed."""
    for partial in (Path(out_dir) / CHECKPOINTS).glob("*.partial"):
        shutil.rmtree(partial)
    found = sorted((Path(out_dir) / CHECKPOINTS).glob("step-*[0-9]"))
    return found[-1] if found else None


def load_state(checkpoint: Path, device="cpu") -> dict:
    import torch

    return torch.load(Path(checkpoint) / STATE_FILE, weights_only=False, map_location=device)


def remove_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)
