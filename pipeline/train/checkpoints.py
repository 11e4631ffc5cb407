"""Training checkpoints that exist whole or not at all: `step-XXXXXXXX/` under a run's
`checkpoints/`, written as `.partial` and renamed; the newest `keep` are kept."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from pipeline.errors import FgdataError, first_line

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"  # step, history, optimizer, schedule and RNG state: tensors and plain data only


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
    """The state is tensors and plain data, read with weights_only=True: a state file that holds
    anything else (a pickle that would run code when read) is refused, never unpickled."""
    import pickle

    import torch

    path = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FgdataError(
            f"cannot resume from {path}: not a checkpoint state of tensors and plain data ({first_line(exc)}); "
            f"delete {Path(checkpoint)} to resume from an earlier checkpoint or start over"
        ) from None


def remove_checkpoints(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / CHECKPOINTS, ignore_errors=True)
