"""vLLM backend: offline `LLM.generate` with image inputs and `SamplingParams` (the `gpu` extra)."""

from __future__ import annotations

from PIL import Image

from pipeline.errors import FgdataError
from pipeline.models.generation import Generation, ModelInfo, Sampling, chat_prompt
from pipeline.models.reference import is_random_model


class VllmVLM:
    def __init__(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str, tensor_parallel_size: int):
        try:
            import vllm
        except ImportError:
            raise FgdataError("the vllm backend needs vLLM: pip install 'fgdata[gpu]' (or set recaption.backend=transformers)") from None
        from transformers import AutoProcessor

        self._vllm = vllm
        # The chat template comes from the model's own processor, as in the transformers backend,
        # so both backends send the model the same prompt.
        self.processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.llm = vllm.LLM(
            model=model,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            limit_mm_per_prompt={"image": 1},
        )
        self.info = ModelInfo(model=model, revision=revision, backend="vllm", is_random=is_random_model(model))

    def generate(self, images: list[Image.Image], prompt: str, sampling: Sampling) -> list[Generation]:
        text = chat_prompt(self.processor, prompt)
        params = self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            seed=sampling.seed,
        )
        requests = [{"prompt": text, "multi_modal_data": {"image": image}} for image in images]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            finish = "length" if completion.finish_reason == "length" else "stop"
            results.append(Generation(text=completion.text.strip(), tokens=len(completion.token_ids), finish_reason=finish))
        return results
