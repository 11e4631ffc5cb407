"""Tiny random-initialised models built from the real config classes, for tests and the offline demo.

They go through exactly the loading path a hub model takes (`from_pretrained` on a directory),
and carry a marker file so every row they produce is labelled as coming from random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.scoped import torch_seed
from pipeline.models.reference import RANDOM_WEIGHTS_MARKER

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# A minimal chat template in the Qwen2.5-VL format: image placeholder, then the text.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_bpe(texts: list[str], special_tokens: list[str]):
    """A real byte-level BPE tokenizer trained on the fly (no vocabulary files can be downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return bpe


def _save_random(model_class, config, preprocessor, out_dir: Path, seed: int) -> Path:
    """Initialises `model_class` from `config` with a fixed seed and saves it as a hub model is laid
    out, with its tokenizer or processor and the random-weights marker."""
    with torch_seed(seed):
        model = model_class(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    preprocessor.save_pretrained(out_dir)
    marker = {"architecture": model_class.__name__, "seed": seed, "note": "random weights: output is noise"}
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def _clip_tokenizer(texts: list[str]):
    """A byte-level BPE with CLIP's special tokens that wraps every text as <start> ... <end>.

    Saved as a generic fast tokenizer, so `AutoTokenizer` loads exactly this one back (a
    `CLIPTokenizer` would rebuild it from vocab and merges with CLIP's own word-end rules)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    # id 0 stays unused: OWL treats a query whose first id is 0 as padding. The end token must not
    # be id 2: CLIP takes an eos id of 2 for an old config and pools at the highest token id instead
    bpe = _byte_level_bpe(texts, ["<|unused|>", "<|endoftext|>", "<|startoftext|>"])
    bpe.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_max_length=77,
    )


def _clip_text_config(tokenizer, projection_dim: int) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_clip_text(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A tiny random CLIPTextModelWithProjection with 512-d output, the width YOLO-World v2 takes."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer(vocabulary_texts)
    config = CLIPTextConfig(**_clip_text_config(tokenizer, projection_dim=512))
    return _save_random(CLIPTextModelWithProjection, config, tokenizer, out_dir, seed)


def build_tiny_owlv2(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A tiny random Owlv2ForObjectDetection (64 px input) with its processor."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = _clip_tokenizer(vocabulary_texts)
    text_config = _clip_text_config(tokenizer, projection_dim=32)
    text_config.pop("projection_dim")
    vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16)
    config = Owlv2Config(text_config=text_config, vision_config=vision_config, projection_dim=32)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer)
    return _save_random(Owlv2ForObjectDetection, config, processor, out_dir, seed)


def build_tiny_nli(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A tiny random DebertaV2ForSequenceClassification with MNLI's three labels and a WordPiece
    tokenizer that encodes (premise, hypothesis) pairs as [CLS] a [SEP] b [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(vocabulary_texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=special))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=256, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "contradiction", 1: "entailment", 2: "neutral"}, label2id={"contradiction": 0, "entailment": 1, "neutral": 2},
    )
    return _save_random(DebertaV2ForSequenceClassification, config, tokenizer, out_dir, seed)


def build_tiny_llm(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM (a Llama-3.1-Instruct-shaped model, 2 layers) with a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(vocabulary_texts, special), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _save_random(LlamaForCausalLM, config, tokenizer, out_dir, seed)


def build_tiny_vlm(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A ~0.2M-parameter Qwen2.5-VL (real Qwen2_5_VLForConditionalGeneration) with a BPE
    vocabulary trained on `vocabulary_texts`, saved with its processor to `out_dir`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    bpe = _byte_level_bpe(vocabulary_texts, _SPECIAL_TOKENS)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    special = {"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **special,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_CHAT_TEMPLATE,
    )
    return _save_random(Qwen2_5_VLForConditionalGeneration, config, processor, out_dir, seed)


def build_tiny_t5(out_dir: Path, vocabulary_texts: list[str], seed: int = 0) -> Path:
    """A tiny random T5ForConditionalGeneration (Flan-T5's architecture: gated-GELU, untied head)
    with a BPE vocabulary trained on `vocabulary_texts`, laid out like T5's: <pad>=0, </s>=1, <unk>=2,
    and </s> appended to every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    special = ["<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(vocabulary_texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=special))
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return _save_random(T5ForConditionalGeneration, config, tokenizer, out_dir, seed)


def build_tiny_clip(out_dir: Path, vocabulary_texts: list[str], seed: int = 0, image_size: int = 64, patch_size: int = 8) -> Path:
    """A tiny random CLIPModel (both towers, 64-d joint space) with its tokenizer and image processor,
    for training tests: 64 px images in 8 px patches give an 8 x 8 grid for RoIAlign."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer(vocabulary_texts)
    text_config = _clip_text_config(tokenizer, projection_dim=64)
    text_config.update(hidden_size=64, intermediate_size=128)
    vision_config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=64)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return _save_random(CLIPModel, config, processor, out_dir, seed)
