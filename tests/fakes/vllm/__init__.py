"""FAKE vllm module for tests only: records how the adapter calls vLLM, generates nothing real.

vLLM needs a GPU and cannot be installed on the test machines; this stand-in checks the exact
calls and parameters of pipeline.models.vllm_vlm. Its "outputs" are fixed strings.
"""

from dataclasses import dataclass, field
from types import SimpleNamespace

CALLS: list = []
RESPONDER = None  # a test may set a function prompt -> answer text; default: "fake output <i>"


class StructuredOutputsParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


sampling_params = SimpleNamespace(StructuredOutputsParams=StructuredOutputsParams)


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        CALLS.append(("SamplingParams", kwargs))


@dataclass
class FakeCompletion:
    text: str
    token_ids: list = field(default_factory=list)
    finish_reason: str = "stop"


@dataclass
class FakeRequestOutput:
    outputs: list


class LLM:
    def __init__(self, **kwargs):
        CALLS.append(("LLM", kwargs))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        CALLS.append(("generate", {"prompts": prompts, "sampling_params": sampling_params, "use_tqdm": use_tqdm}))
        finish = "length" if sampling_params.kwargs["max_tokens"] < 8 else "stop"
        texts = [RESPONDER(p) if RESPONDER else f" fake output {i} " for i, p in enumerate(prompts)]
        return [FakeRequestOutput([FakeCompletion(text, [1, 2, 3], finish)]) for text in texts]
