"""``mmbridge export --format hf``: a saved mmbridge model → a transformers directory that transformers alone loads.

Tiny random models with wide weights (initialiser range 0.2, so images and LoRA visibly move the answers): a
CLIP or SigLIP tower (16 px, patch 4), a 2-layer Llama with LoRA on q/v merged at export, the tiny ChatML
tokenizer with ``<image>`` added. Each export is loaded back with ``AutoProcessor`` and the model class; the
processor's ids and pixels for a chat-templated question about a PIL image must be mmbridge's, and greedy
``generate`` must give mmbridge's ``chat`` answer. Then the refusals, atomic writing and ``--force``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (AutoProcessor, AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                          Blip2VisionConfig, IdeficsConfig, IdeficsForVisionText2Text, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, OPTConfig)

import mmbridge.interop.export as export_module
from mmbridge.cli import main
from mmbridge.interop import from_hf_blip2, from_hf_idefics, idefics_inputs
from mmbridge.interop.export import export_hf
from mmbridge.model.lora import LoraSpec
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import shape_image, tiny_llm_config, tiny_model_config, tiny_vision_config

INIT_RANGE = 0.2
NEW_TOKENS = 8
QUESTION = "What colour is the shape?"
CLIP_CROP = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}, "do_center_crop": True,
             "resample": 3}  # CLIP's shortest edge + center crop
SIGLIP_EXACT = {"size": {"height": 16, "width": 16}, "resample": 2, "image_mean": [0.5, 0.4, 0.3]}  # exact resize


def _images() -> list[Image.Image]:
    """A wide and a tall image (crops, padding and tiles all show)."""
    return [shape_image("red", "circle", 40).resize((40, 24)), shape_image("blue", "square", 40).resize((20, 44))]


def _build(tokenizer_dir: str, tower: str = "clip", image_processor: dict | None = None, pad: bool = False,
           highres: dict | None = None, seed: int = 0) -> MultimodalModel:
    """A seeded tiny LLaVA-shaped model with wide weights and a randomised LoRA on the LLM's q/v projections."""
    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1  # + the <image> token the model adds
    vision = {"hf_config": tiny_vision_config(f"{tower}_vision_model"), "image_processor": image_processor,
              "pad_to_square": pad}
    llm = {"hf_config": tiny_llm_config(vocab, initializer_range=INIT_RANGE)}
    model = MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, vision=vision, llm=llm,
                                                          highres=highres))
    torch.nn.init.normal_(model.bridge.linear_1.weight, std=INIT_RANGE)
    model.add_lora("llm", LoraSpec(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def _save(model: MultimodalModel, directory: str) -> str:
    model.save_pretrained(directory)
    return directory


def _export(model_dir: str, out: str, *flags: str) -> int:
    return main(["export", "--model", model_dir, "--format", "hf", "--out", out, *flags])


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: str) -> str:
    """A saved CLIP-cropping LLaVA-shaped model, shared by the tests that only export it."""
    return _save(_build(tokenizer_dir, image_processor=CLIP_CROP), str(tmp_path_factory.mktemp("llava")))


def _assert_answers_match(model_dir: str, out: str, hf_class: type) -> None:
    """transformers alone (processor from OUT, chat-templated prompt, PIL image) answers as mmbridge's chat."""
    model = MultimodalModel.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(out)
    hf_model = hf_class.from_pretrained(out).eval()
    assert not any("lora" in name for name in hf_model.state_dict())
    messages = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for image in _images():
        inputs = processor(text=text, images=image, return_tensors="pt")
        ours = model.processor().prompt_inputs(QUESTION, [image])
        assert inputs["input_ids"][0].tolist() == ours["input_ids"].tolist()
        torch.testing.assert_close(inputs["pixel_values"].reshape(ours["pixel_values"].shape), ours["pixel_values"],
                                   atol=1e-5, rtol=0)
        with torch.no_grad():
            new = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        expected = model.chat(QUESTION, [image], max_new_tokens=NEW_TOKENS, do_sample=False)
        assert answer == expected and answer  # wide weights: a real answer, not an empty string


# -- exports that transformers loads alone -----------------------------------------------------------
@pytest.mark.parametrize("tower,image_processor,pad", [("clip", CLIP_CROP, False), ("siglip", SIGLIP_EXACT, True)])
def test_llava_export_answers_as_mmbridge(tokenizer_dir, tmp_path, capsys, tower, image_processor, pad) -> None:
    model_dir = _save(_build(tokenizer_dir, tower, image_processor, pad, seed=1), str(tmp_path / "model"))
    out = str(tmp_path / "hf")
    assert _export(model_dir, out) == 0
    assert "LlavaForConditionalGeneration + LlavaProcessor" in capsys.readouterr().out
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    settings = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert settings["image_processor_type"] == "LlavaImageProcessor" and settings["do_pad"] is pad
    assert settings["size"] == image_processor["size"] and settings["resample"] == image_processor["resample"]
    assert settings["do_center_crop"] is (tower == "clip")
    processor_settings = json.load(open(os.path.join(out, "processor_config.json")))
    assert processor_settings["processor_class"] == "LlavaProcessor"
    assert (processor_settings["patch_size"], processor_settings["num_additional_image_tokens"]) == \
        (4, int(tower == "clip"))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as weights:
        assert not any("lora" in name for name in weights.keys())
    _assert_answers_match(model_dir, out, LlavaForConditionalGeneration)


def test_llava_next_export_answers_as_mmbridge(tokenizer_dir, tmp_path) -> None:
    highres = {"type": "anyres", "grid": [[1, 2], [2, 1], [2, 2]]}
    model_dir = _save(_build(tokenizer_dir, image_processor=CLIP_CROP, highres=highres, seed=2), str(tmp_path / "m"))
    out = str(tmp_path / "hf")
    assert _export(model_dir, out) == 0
    settings = json.load(open(os.path.join(out, "preprocessor_config.json")))
    assert settings["image_processor_type"] == "LlavaNextImageProcessor"
    assert settings["image_grid_pinpoints"] == [[16, 32], [32, 16], [32, 32]]
    assert json.load(open(os.path.join(out, "processor_config.json")))["processor_class"] == "LlavaNextProcessor"
    _assert_answers_match(model_dir, out, LlavaNextForConditionalGeneration)


def test_system_prompt_becomes_the_templates_default(tokenizer_dir, tmp_path) -> None:
    """A saved system prompt (quotes, newline, non-ASCII) leads the exported template as mmbridge inserts it."""
    model = _build(tokenizer_dir, image_processor=CLIP_CROP)
    model.processor_settings["system_prompt"] = 'Answer "briefly".\nÜber alles: one word.'
    export_hf(model, tmp_path / "hf")  # the export itself checks the prompt ids against mmbridge's
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.startswith('<|im_start|>system\nAnswer "briefly".\nÜber alles: one word.<|im_end|>')


def _blip2(tokenizer: Any) -> MultimodalModel:
    """A tiny BLIP-2 (OPT) imported from transformers, with wide weights."""
    torch.manual_seed(3)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "image_size": 16, "patch_size": 4, "initializer_range": INIT_RANGE}
    text = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=len(tokenizer) + 1, word_embed_proj_dim=32, init_std=INIT_RANGE,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=Blip2VisionConfig(**tower), text_config=text, num_query_tokens=4,
                         qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=64, initializer_range=INIT_RANGE),
                         image_token_index=len(tokenizer), initializer_range=INIT_RANGE)
    return from_hf_blip2(Blip2ForConditionalGeneration(config).eval(), tokenizer=tokenizer)


def _idefics(tokenizer: Any) -> MultimodalModel:
    """A tiny IDEFICS imported from transformers, gates open, with wide weights."""
    tokenizer.add_tokens(["<fake_token_around_image>", "<image>"], special_tokens=True)
    config = IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, cross_layer_interval=1, use_resampler=True,
        initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 4, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 64, "initializer_range": INIT_RANGE},
        perceiver_config={"resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2,
                          "resampler_head_dim": 8})
    torch.manual_seed(4)
    hf_model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for layer in hf_model.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.fill_(0.7)
            layer.alpha_dense.fill_(0.4)
    return from_hf_idefics(hf_model, tokenizer=tokenizer)


OTHER_FAMILIES = {  # builder, transformers class, processor class, the processor's text input
    "blip2": (_blip2, Blip2ForConditionalGeneration, "Blip2Processor", lambda image: "Question: what colour? Answer:"),
    "idefics": (_idefics, IdeficsForVisionText2Text, "IdeficsProcessor",
                lambda image: [["User: what colour?", image, "Assistant:"]]),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_decode_as_mmbridge_on_their_processors_tensors(tokenizer_dir, tmp_path, family) -> None:
    """BLIP-2 and IDEFICS processors lay out prompts their own way (queries first, fake-token runs); on the tensors
    they build, the exported model decodes greedily as mmbridge does (the image token banned on both sides)."""
    build, hf_class, processor_class, text = OTHER_FAMILIES[family]
    model = build(AutoTokenizer.from_pretrained(tokenizer_dir))
    exported = export_hf(model, tmp_path / "hf")
    assert (exported.model_class, exported.processor_class) == (hf_class.__name__, processor_class)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    hf_model = hf_class.from_pretrained(tmp_path / "hf").eval()
    image = _images()[0]
    inputs = processor(images=None if family == "idefics" else [image], text=text(image), return_tensors="pt")
    extra = {"image_attention_mask": inputs["image_attention_mask"]} if family == "idefics" else {}
    with torch.no_grad():  # BLIP-2 decodes through its language model's own generation config: ban explicitly
        theirs = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   bad_words_ids=[[model.image_token_id]])[0, -NEW_TOKENS:]
        ours = model.generate(**idefics_inputs({key: inputs[key] for key in ("input_ids", "attention_mask",
                                                                              "pixel_values")} | extra),
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0]
    assert theirs.tolist() == ours.tolist()


# -- refusals ----------------------------------------------------------------------------------------
REFUSALS = [  # model parts, the error
    ({"vision": {"type": "efficientnet_lite0", "pretrained": False, "image_size": 64}},
     "vision encoder efficientnet_lite0 has no transformers counterpart; LLaVA export needs an HF tower"),
    ({"bridge": {"type": "visual_expert"}}, "bridge visual_expert .deep fusion.* has no transformers counterpart"),
    ({"bridge": {"type": "perceiver", "num_latents": 4}},
     "bridge perceiver has no transformers counterpart .a perceiver exports only as IDEFICS' resampler"),
    ({"highres": {"type": "uhd", "max_slices": 4}},
     "high-resolution strategy uhd has no transformers counterpart; LLaVA-NeXT export needs 'anyres'"),
    ({"bridge": {"type": "mlp", "depth": 3}}, "LLaVA's projector has exactly 2 linear layers"),
]


@pytest.mark.parametrize("parts,message", REFUSALS)
def test_models_without_a_transformers_class_are_refused(make_model, tmp_path, parts, message) -> None:
    with pytest.raises(ValueError, match=message):
        export_hf(make_model(**parts), tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary directory


def test_cli_refusal_is_one_line_and_writes_nothing(make_model, tmp_path, capsys) -> None:
    model_dir = _save(make_model(bridge={"type": "visual_expert"}), str(tmp_path / "model"))
    assert _export(model_dir, str(tmp_path / "hf")) == 2
    assert "mmbridge export: error: bridge visual_expert" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["model"]


# -- atomic writing, --force -------------------------------------------------------------------------
def test_a_failure_while_writing_leaves_no_partial_out(saved_llava, tmp_path, monkeypatch, capsys) -> None:
    """The processor's settings are spoiled after the weights were written: the self-check fails, OUT never appears,
    and an existing OUT being replaced with --force is left as it was."""
    real = export_module.image_settings
    monkeypatch.setattr(export_module, "image_settings", lambda transform: {**real(transform), "image_mean": [0.1] * 3})
    out = tmp_path / "hf"
    assert _export(saved_llava, str(out)) == 2
    assert "do not read back to the model's image transform" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    out.mkdir()
    (out / "keep.txt").write_text("old export")
    assert _export(saved_llava, str(out), "--force") == 2
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["hf"]


def test_force_replaces_a_non_empty_out(saved_llava, tmp_path, capsys) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    assert _export(saved_llava, str(out)) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == ["stale.bin"]
    assert _export(saved_llava, str(out), "--force") == 0
    assert "stale.bin" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # the replaced directory and the staging one are gone
    (tmp_path / "file").write_text("x")
    assert _export(saved_llava, str(tmp_path / "file"), "--force") == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert _export(saved_llava, saved_llava, "--force") == 2
    assert "would replace the model directory" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(saved_llava, "config.json"))


def test_an_empty_out_is_filled_without_force(saved_llava, tmp_path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    assert _export(saved_llava, str(out)) == 0
    assert (out / "processor_config.json").is_file()
