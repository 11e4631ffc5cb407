"""Generate text from text prompts (instruction LLMs): transformers or vLLM, same interface."""

from __future__ import annotations

import json

from pipeline.errors import FgdataError, first_line
from pipeline.models.generation import Generation, Sampling, sample_new_tokens, to_generation
from pipeline.models.reference import gguf_file, is_random_model, model_note


def labelled(name: str, note: str | None) -> str:
    """The model's name as rows and manifests record it, with what a demo model's output is worth."""
    return f"{name} [{note}]" if note else name


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


class TransformersLM:
    def __init__(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = ("bfloat16" if self.device == "cuda" else "float32") if dtype == "auto" else dtype
        gguf = gguf_file(model)
        # a GGUF file holds weights, tokenizer and chat template; transformers de-quantizes it on load
        where, options = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (model, {"revision": revision, "trust_remote_code": trust_remote_code})
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, **options)
            self.model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype), **options, **({} if gguf else {"use_safetensors": True}))
        except (OSError, ValueError) as exc:
            raise FgdataError(f"cannot load language model {model!r} with transformers: {first_line(exc)}") from None
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.note = model_note(model)
        self.name, self.is_random = labelled(f"{model} (transformers)", self.note), is_random_model(model)
        self._grammars: dict[str, object] = {}  # a JSON schema -> its grammar compiled for this tokenizer

    def generate(self, prompts: list[str], sampling: Sampling, json_schema: dict | None = None) -> list[Generation]:
        """With `json_schema`, every answer is held to it token by token, as vLLM's structured outputs
        hold it (xgrammar, vLLM's default engine for them): an answer is that JSON, or is cut at
        max_new_tokens. The caller parses and checks it the same way for both backends."""
        chats = [_chat(self.tokenizer, p) for p in prompts]
        inputs = self.tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        options = {"pad_token_id": self.tokenizer.pad_token_id}
        if json_schema is not None:
            # before temperature and top-p, as in vLLM: sampling chooses among the allowed tokens only
            options["logits_processor"] = [self._schema_processor(json_schema)]
        new_tokens = sample_new_tokens(self.model, inputs, sampling, **options)
        return [to_generation(ids, self._eos_ids, self.tokenizer.pad_token_id, self.tokenizer.decode) for ids in new_tokens]

    def _schema_processor(self, json_schema: dict):
        import xgrammar
        from xgrammar.contrib.hf import LogitsProcessor

        key = json.dumps(json_schema)  # as given to vLLM: the grammar keeps the properties in this order
        if key not in self._grammars:
            # the model's vocabulary can be larger than the tokenizer's (padded rows); the mask spans it
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.model.get_output_embeddings().weight.shape[0], stop_token_ids=sorted(self._eos_ids)
            )
            self._grammars[key] = xgrammar.GrammarCompiler(info).compile_json_schema(key)
        return LogitsProcessor(self._grammars[key])  # one per generate call: it keeps each row's state


class VllmLM:
    def __init__(self, model: str, *, revision: str | None, trust_remote_code: bool, dtype: str, tensor_parallel_size: int):
        try:
            import vllm
        except ImportError:
            raise FgdataError("the vllm backend needs vLLM: pip install 'fgdata[gpu]' (or set the backend to transformers)") from None
        from transformers import AutoTokenizer

        self._vllm = vllm
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        # every prompt starts with the same instructions: prefix caching computes them once
        self.llm = vllm.LLM(
            model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
            tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
        )
        self.note = None
        self.name, self.is_random = f"{model} (vllm)", is_random_model(model)

    def generate(self, prompts: list[str], sampling: Sampling, json_schema: dict | None = None) -> list[Generation]:
        vllm = self._vllm
        options = {
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "seed": sampling.seed,
        }
        if json_schema is not None:  # constrained decoding: the output is valid JSON of this shape
            options["structured_outputs"] = vllm.sampling_params.StructuredOutputsParams(json=json.dumps(json_schema))
        outputs = self.llm.generate([_chat(self.tokenizer, p) for p in prompts], sampling_params=vllm.SamplingParams(**options), use_tqdm=False)
        return [
            Generation(text=o.outputs[0].text.strip(), tokens=len(o.outputs[0].token_ids), finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
            for o in outputs
        ]
