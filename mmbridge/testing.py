"""Tiny random components for tests and the offline tiny pipeline (no downloads).

A byte-level BPE tokenizer trained in milliseconds on a small corpus, with a ChatML
chat template; tiny Llama/Qwen2/Mistral configs; tiny CLIP/SigLIP/ViT towers; and
a few generated images. Everything is seeded.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a Llama-2-style template with BOS and no system prompt, to test label masking on another layout
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
_CORPUS = [
    "The image shows a red circle on a white background.",
    "What colour is the shape? It is blue. Which shape is it? A square.",
    "Describe the picture in detail. There is one green square in the middle.",
    "yes no one two three four five six seven eight nine ten left right above below",
    "You are a helpful assistant. USER: ASSISTANT: system user assistant",
    "0123456789 [INST] [/INST] <image> , . ? ! : ; ' \" ( ) [ ] { } - + = / \\ * # @ & % $",
]


def tiny_tokenizer(directory: str, chat_template: str = CHATML_TEMPLATE, vocab_size: int = 320) -> Any:
    """Train a byte-level BPE tokenizer, save it to ``directory``, and return it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    eos = "<|im_end|>" if chat_template == CHATML_TEMPLATE else "</s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token="<|endoftext|>",
                                   bos_token="<s>", unk_token="<|endoftext|>")
    fast.chat_template = chat_template
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


BERT_WORDS = ("what colour is the shape it which a describe picture there one in middle red green blue yellow circle "
              "square answer using single word or phrase").split()
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", ".", "?", ",", *BERT_WORDS]


def tiny_bert(directory: str) -> str:
    """A tiny BERT checkpoint (hidden 32, 2 layers, safetensors, seeded) with a WordPiece tokenizer over
    :data:`BERT_VOCAB`, written to ``directory``: a Q-Former's ``init_from``. Returns ``directory``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    BertTokenizer(vocab={word: index for index, word in enumerate(BERT_VOCAB)}).save_pretrained(directory)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


def tiny_llm_config(vocab_size: int, model_type: str = "llama", hidden: int = 32, layers: int = 2,
                    **overrides: Any) -> dict:
    """A tiny decoder config dict (llama, qwen2 or mistral) for ``AutoConfig.for_model``."""
    config = {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": hidden,
              "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False}
    config.update(overrides)
    return config


def tiny_t5_config(vocab_size: int, hidden: int = 32, layers: int = 2, pad_token_id: int = 0, eos_token_id: int = 2,
                   **overrides: Any) -> dict:
    """A tiny Flan-T5-shaped encoder-decoder config dict (gated GELU, tied embeddings) for ``AutoConfig.for_model``."""
    config = {"model_type": "t5", "vocab_size": vocab_size, "d_model": hidden, "d_kv": hidden // 4,
              "d_ff": hidden * 2, "num_layers": layers, "num_decoder_layers": layers, "num_heads": 4,
              "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
              "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "pad_token_id": pad_token_id,
              "decoder_start_token_id": pad_token_id, "eos_token_id": eos_token_id, "is_encoder_decoder": True}
    config.update(overrides)
    return config


def tiny_vision_config(model_type: str = "clip_vision_model", image_size: int = 16, patch_size: int = 4,
                       hidden: int = 32, layers: int = 2) -> dict:
    """A tiny vision tower config dict (clip_vision_model, siglip_vision_model or vit)."""
    config = {"model_type": model_type, "image_size": image_size, "patch_size": patch_size,
              "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
              "num_attention_heads": 4}
    if model_type == "clip_vision_model":
        config["projection_dim"] = hidden
    return config


def tiny_model_config(tokenizer_dir: str, vocab_size: int, bridge: dict | None = None,
                      vision: dict | None = None, llm: dict | None = None, highres: dict | None = None,
                      output: dict | None = None) -> dict:
    """A whole :class:`~mmbridge.model.multimodal.ModelConfig` dict of tiny random parts (``highres``: a
    high-resolution strategy spec, or None; ``output``: an output side, ``{"image": {...}}``, or None)."""
    vision_spec = {"type": "hf", "hf_config": tiny_vision_config(), "feature_layer": -2}
    if vision and vision.get("type", "hf") != "hf":
        vision_spec = {}  # another encoder family: its own spec replaces the HF defaults
    return {
        "vision": {**vision_spec, **(vision or {})},
        "llm": {"type": "hf", "hf_config": tiny_llm_config(vocab_size), "tokenizer": tokenizer_dir, **(llm or {})},
        "bridge": bridge or {"type": "mlp", "depth": 2, "activation": "gelu"},
        "highres": highres,
        "output": output,
    }


def shape_image(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    """One coloured shape on a white canvas, placed with a seeded jitter."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = size // 6 + int(rng.integers(0, max(1, size // 8)))
    box = (margin, margin, size - margin, size - margin)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def write_shape_dataset(directory: str, count: int, seed: int = 0, size: int = 32) -> str:
    """Write ``count`` shape images and a LLaVA-format JSON (caption + colour question); returns the JSON path."""
    import json

    rng = np.random.default_rng(seed)
    images = os.path.join(directory, "images")
    os.makedirs(images, exist_ok=True)
    samples = []
    for index in range(count):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        name = f"{index:04d}.png"
        shape_image(colour, shape, size, seed=seed * 100003 + index).save(os.path.join(images, name))
        samples.append({"id": f"shape-{index}", "image": f"images/{name}", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": f"It is {colour}."},
            {"from": "human", "value": "Which shape is it?"},
            {"from": "gpt", "value": f"A {shape}."},
        ]})
    path = os.path.join(directory, "data.json")
    with open(path, "w") as handle:
        json.dump(samples, handle, indent=1)
    return path


def data_loss(model: Any, data: dict, max_length: int | None = None, batch_size: int = 16) -> float:
    """Mean label-token loss of ``model`` over every sample of ``data`` (a DataConfig dict), in eval mode.

    Tests judge training by this deterministic figure before and after, not by per-step training
    losses: those are losses on different batches, whose order a rounding difference can flip.
    """
    import torch

    from mmbridge.data import DataConfig, MixtureDataset, collate, model_inputs
    from mmbridge.utils import eval_mode

    spec = {key: value for key, value in data.items() if key != "feature_cache"}
    processor = model.processor(**({"max_length": max_length} if max_length else {}))
    dataset = MixtureDataset(DataConfig(**spec), processor)
    total, tokens = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))],
                            processor.pad_token_id)
            output = model(**model_inputs(batch), return_logits="none")
            total += float(output.loss) * output.num_label_tokens
            tokens += output.num_label_tokens
    return total / tokens


CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def tiny_clip_tokenizer(model_max_length: int = 12) -> Any:
    """A character-level CLIP BPE tokenizer (lower-case letters, digits, a few signs, two merges), built offline."""
    from transformers import CLIPTokenizer

    vocab = {token: index for index, token in enumerate(CLIP_SPECIALS)}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    merges = [("r", "e"), ("re", "d</w>")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_diffusers_pipeline(directory: str, text_encoder: str = "clip", condition_length: int = 16,
                            prediction_type: str = "epsilon", scheduler: str = "ddim") -> str:
    """A tiny random ``StableDiffusionPipeline`` saved to ``directory`` (returned), with diffusers' own dummy
    component sizes: UNet channels (4, 8), one layer per block, 2 norm groups, cross-attention width 32; a VAE of
    channels (4, 8) (scale factor 2; default images 16 × 16); ``text_encoder`` ``clip`` (CLIPTextModel +
    CLIPTokenizer) or ``bert`` (:func:`tiny_bert`, hidden 32); the tokenizer's ``model_max_length`` is
    ``condition_length``. ``scheduler``: ``ddim`` or ``euler_ancestral`` (stochastic steps). Seeded."""
    import tempfile

    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel

    schedulers = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}
    options = {"clip_sample": False, "set_alpha_to_one": False} if scheduler == "ddim" else {}
    noise_schedule = schedulers[scheduler](beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           prediction_type=prediction_type, steps_offset=1, **options)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2)
    if text_encoder == "clip":
        tokenizer = tiny_clip_tokenizer(condition_length)
        encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, num_hidden_layers=2, bos_token_id=0,
                                               eos_token_id=1, pad_token_id=1,
                                               max_position_embeddings=condition_length))
    elif text_encoder == "bert":
        with tempfile.TemporaryDirectory() as bert_dir:
            tiny_bert(bert_dir)
            tokenizer = BertTokenizer.from_pretrained(bert_dir, model_max_length=condition_length)
            encoder = BertModel.from_pretrained(bert_dir)
    else:
        raise ValueError(f"text_encoder must be 'clip' or 'bert', got '{text_encoder}'")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=noise_schedule, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return directory
