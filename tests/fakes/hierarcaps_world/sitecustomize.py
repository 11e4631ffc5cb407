"""FAKE LLM answers for tests only: with this folder and tests/fakes on PYTHONPATH, every Python
process (the `fgdata` command and its Ray workers) imports the FAKE vllm of tests/fakes and makes
it answer seed and augment prompts with the rule world's chain for the caption (bench/synthetic.py:
`a <size> <colour> <object> <verb> <place>` -> `object => colour object => colour object place`),
and anything outside that world with text that is no chain. vLLM needs a GPU; this lets a test run
the whole hierarcaps recipe through the real vLLM adapter, stages and scheduler."""

from pathlib import Path

import vllm

# never patch a real vLLM: only the FAKE next to this folder
assert Path(vllm.__file__).resolve().parent == Path(__file__).resolve().parent.parent / "vllm", vllm.__file__


def world_chain(prompt: str) -> str:
    """The chain above the prompt's (last) caption, or a refusal the stage must reject."""
    caption = prompt.rpartition("Caption:")[2].split("\n")[0].strip()
    words = caption.split()
    if len(words) < 6 or words[0] != "a":
        return "I cannot describe this caption."
    colour, obj, place = words[2], words[3], " ".join(words[5:])
    return f"{obj} => {colour} {obj} => {colour} {obj} {place}"


vllm.RESPONDER = world_chain
