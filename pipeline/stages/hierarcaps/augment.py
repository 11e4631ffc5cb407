"""`fgdata hierarcaps augment`: seed, with chains that already passed the NLI filter as examples.

The `{examples}` of `hierarcaps.augment_prompt` are filled with validated chains (a different draw
for every caption), so the validated set grows and diversifies itself.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import Config
from pipeline.core.shards import lineage_entry
from pipeline.core.storage import resolved
from pipeline.datasets.chains import SEPARATOR, normal_text
from pipeline.datasets.hierarcaps_csv import read_chains
from pipeline.errors import FgdataError
from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

MAX_DEMONSTRATION_POOL = 20_000  # chains kept to draw augment examples from


def format_examples(chains: list[list[str]]) -> str:
    return "\n\n".join(f"Caption: {tiers[-1]}\nHierarchy: {SEPARATOR.join(tiers[:-1])}" for tiers in chains)


def draw_demonstrations(pool: list[list[str]], key: str, caption: str, count: int, seed: int) -> list[list[str]]:
    """The examples one caption's prompt shows: fixed by the key and seed, so reruns repeat them;
    never the caption's own chain (that would hand the model the answer)."""
    drawn = random.Random(f"{seed}:{key}").sample(pool, min(count + 1, len(pool)))
    return [tiers for tiers in drawn if normal_text(tiers[-1]) != normal_text(caption)][:count]


class HierarcapsAugmentStage(HierarcapsSeedStage):
    name = "hierarcaps-augment"
    prompt_setting = "augment_prompt"

    def __init__(self, captions: Path, demonstrations: Path):
        super().__init__(captions)
        self.demonstrations_dir = resolved(demonstrations)  # a local path or a URI
        self.examples: list[list[str]] = []  # validated chains the prompts draw from, set by plan

    def check_template(self, template: str, config: Config) -> None:
        if "{examples}" not in template:
            raise FgdataError(f"augment prompt {self._prompt_name(config)!r} has no {{examples}} placeholder")
        chains = [tiers for _, tiers, _ in read_chains([self.demonstrations_dir])]
        self.examples = random.Random(config.hierarcaps.seed).sample(chains, min(len(chains), MAX_DEMONSTRATION_POOL))

    def plan_fingerprint(self) -> str:
        return repr(self.examples)

    def lineage(self) -> list[dict]:
        return [*super().lineage(), lineage_entry(self.demonstrations_dir, role="demonstrations")]

    def extra_values(self, item: dict, settings) -> dict[str, str]:
        examples = draw_demonstrations(self.examples, item["key"], item["caption"], settings.demonstrations, settings.seed)
        return {"examples": format_examples(examples)}
