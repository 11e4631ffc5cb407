"""Training checkpoints that exist whole or not at all: `step-XXXXXXXX/` under a run's
`checkpoints/`, written as `.partial` and renamed; the newest `keep` are kept. And the random
state a run saves in them: python `random`, numpy, torch CPU and the run's CUDA device."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.storage import is_uri, location
from pipeline.errors import FgdataError, first_line

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"  # step, history, best, config, optimizer, schedule and RNG state: tensors and plain data only


def local_model_dir(out_dir) -> Path:
    """`--out` of a training run, checked before any work: a local folder. A run saves checkpoints
    as folders renamed whole and resumes by reading them back, which an object store (no rename,
    no atomic folder) cannot give; a finished model folder is copied to a store in one step."""
    if is_uri(out_dir):
        raise FgdataError(
            f"--out {out_dir}: a model is trained into a local folder; give a local path, then copy the finished "
            "folder to the store (e.g. `aws s3 cp --recursive DIR s3://...`, `gsutil cp -r`, `huggingface-cli upload`)"
        )
    return location(out_dir)  # file:///abs as /abs


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


def rng_state(device: str = "cpu") -> dict:
    """Every generator a training step may draw from, as tensors and plain data (numpy's and
    python's states are converted: a state file holds nothing torch.load(weights_only=True) refuses)."""
    import numpy as np
    import torch

    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "rng": torch.get_rng_state(),
        # the run's own device only: get_rng_state_all would start a CUDA context on every GPU of the node
        "cuda_rng": torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None,
        "python_rng": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(cached)},
    }


def set_rng_state(state: dict, device: str = "cpu") -> None:
    """Puts back what rng_state saved; a generator the state lacks (an older checkpoint) is left as it is."""
    import numpy as np
    import torch

    torch.set_rng_state(state["rng"])
    cuda = state.get("cuda_rng")
    if cuda is not None and str(device).startswith("cuda"):
        if isinstance(cuda, list):  # distill's checkpoints before one device's state was kept
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda, device)
    if state.get("python_rng") is not None:
        saved = state["python_rng"]
        random.setstate((saved["version"], tuple(saved["words"].tolist()), saved["gauss"]))
    if state.get("numpy_rng") is not None:
        saved = state["numpy_rng"]
        np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["gauss"]))


@contextmanager
def seeded(seed: int, device: str = "cpu"):
    """A run's random numbers (dropout, data-loader worker seeds) come from `seed`, and stay in the
    run: every generator is seeded on entry and the caller's states are put back on exit, so
    training leaves no hidden change to the process's global random state."""
    import numpy as np
    import torch

    saved = rng_state(device)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA devices too
    try:
        yield
    finally:
        set_rng_state(saved, device)
