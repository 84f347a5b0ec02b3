"""The contract for bridges inside the LLM (DESIGN.md), shown for visual_expert, mma and moe on Llama and Qwen2:
names, identity at init, gradients, one generate (cache = no cache, left padding), save/load, stages, info."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from mmbridge.cli import info_text
from mmbridge.config import RunConfig
from mmbridge.model.bridges import build_bridge
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import StageConfig, apply_stage, train

from conftest import build_with_llm as build, image_batch, waken

FUSION = {"visual_expert": {"type": "visual_expert"}, "mma": {"type": "mma"},
          "moe": {"type": "moe", "every": 1, "num_experts": 3, "top_k": 2},
          "gated_xattn": {"type": "gated_xattn", "resampler": {"type": "perceiver", "num_latents": 4, "depth": 1,
                                                               "heads": 4}}}
FAMILIES = ["llama", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", FUSION)
def test_llm_names_stay_and_new_weights_live_under_bridge(tokenizer_dir, name, family):
    base = build(tokenizer_dir, {"type": "mlp"}, family)
    model = build(tokenizer_dir, FUSION[name], family)
    assert list(model.llm.state_dict()) == list(base.llm.state_dict())
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))  # nothing registered twice
    added = set(names) - {n for n, _ in base.named_parameters()}
    assert added and all(n.startswith("bridge.") for n in added)
    inside = {n for n in added if not n.startswith("bridge.projector.")}
    assert inside, f"{name} added nothing inside the LLM"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", FUSION)
def test_fresh_model_gives_the_base_llm_logits_on_text(tokenizer_dir, name, family):
    base = build(tokenizer_dir, {"type": "mlp"}, family)
    model = build(tokenizer_dir, FUSION[name], family)
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    vocab = base.llm.config.vocab_size  # gated_xattn adds <|endofchunk|>: compare the shared vocabulary
    with torch.no_grad():
        expected = base(ids, torch.ones_like(ids)).logits
        got = model(ids, torch.ones_like(ids)).logits[..., :vocab]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    waken(model)  # and the test can fail: trained parts change text logits (visual experts excepted)
    with torch.no_grad():
        moved = (model(ids, torch.ones_like(ids)).logits[..., :vocab] - expected).abs().max()
    assert (moved == 0) if name == "visual_expert" else (moved > 1e-3)


@pytest.mark.parametrize("name", FUSION)
def test_gradients_reach_exactly_the_bridge(tokenizer_dir, name):
    model = build(tokenizer_dir, FUSION[name])
    apply_stage(model, StageConfig(name="s", train={"bridge": "full"}), log=False)
    waken(model)
    model.train()
    model(**image_batch(model)).loss.backward()
    # in the last layer only the visual positions' keys/values reach a text token: the expert query, output
    # projection and FFN there feed visual positions' outputs, which predict nothing
    dead_ends = tuple(f"bridge.layers.1.experts.{part}." for part in ("q_proj", "o_proj", "mlp"))
    for parameter_name, parameter in model.named_parameters():
        if parameter_name.startswith("bridge."):
            assert parameter.grad is not None, parameter_name
            assert (parameter.grad.abs().sum() > 0) != parameter_name.startswith(dead_ends), parameter_name
        else:
            assert parameter.grad is None, parameter_name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", FUSION)
def test_greedy_generation_with_cache_equals_without_and_alone(tokenizer_dir, name, family):
    model = build(tokenizer_dir, FUSION[name], family)
    waken(model)
    batch = image_batch(model, left_pad=3)
    settings = {"max_new_tokens": 8, "eos_token_id": []}
    cached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **settings)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], use_cache=False,
                              **settings)
    assert torch.equal(cached, uncached)
    alone = model.generate(batch["input_ids"][:1, 3:], pixel_values=batch["pixel_values"][:1], **settings)
    assert torch.equal(cached[:1], alone)


@pytest.mark.parametrize("name", FUSION)
def test_save_and_reload_give_identical_logits(tokenizer_dir, tmp_path, name):
    model = build(tokenizer_dir, FUSION[name])
    waken(model)
    batch = image_batch(model)
    model.save_pretrained(str(tmp_path))
    loaded = MultimodalModel.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


# idle parameters per token, by hand for the tiny Llama (hidden 32, FFN 64, 4 heads of 8, 2 KV heads, 2 layers, no
# biases): attention q, o 32×32 and k, v 32×16; FFN gate, up 32×64 and down 64×32
ATTENTION, FFN, LAYERS = 2 * 32 * 32 + 2 * 32 * 16, 3 * 32 * 64, 2
IDLE = {"visual_expert": LAYERS * (ATTENTION + FFN),  # a token runs the experts or the originals, never both
        "moe": LAYERS * ((3 - 2) * FFN + FFN),  # E − k = 1 idle expert and the replaced dense FFN per MoE layer
        "mma": 0, "gated_xattn": 0}


@pytest.mark.parametrize("name", FUSION)
def test_info_reports_total_and_active_parameters(tokenizer_dir, name):
    model = build(tokenizer_dir, FUSION[name])
    total = sum(parameter.numel() for parameter in model.parameters())
    idle = model.bridge.inactive_parameters_per_token()
    text = info_text(model)
    assert f"total {total:,}; active per token {total - idle:,}" in text
    assert f"active per token {total - IDLE[name]:,}" in text and idle == IDLE[name]
    if name in ("mma", "gated_xattn"):
        assert idle == 0  # every adapter path (every block) runs for every token
    else:
        assert 0 < idle < total


def _llm_checksum(model: MultimodalModel) -> str:
    digest = hashlib.sha256()
    for parameter_name, tensor in sorted(model.llm.state_dict().items()):
        digest.update(parameter_name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", FUSION)
def test_training_leaves_the_frozen_llm_bit_identical(tokenizer_dir, tmp_path, name):
    data = write_shape_dataset(str(tmp_path / "shapes"), 8, seed=1)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    stage = {"name": "s", "train": {"bridge": "full"}, "lr": 1e-2, "steps": 3, "batch_size": 4, "precision": "bf16"}
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=FUSION[name]), stages=[stage],
                    output_dir=str(tmp_path / "run"), data={"sources": [{"path": data}], "max_length": 128})
    torch.manual_seed(0)
    model = MultimodalModel.from_config(run.model)
    before = _llm_checksum(model)
    bridge_before = {n: p.detach().clone() for n, p in model.bridge.named_parameters()}
    result = train(run, model=model, progress=False)
    assert _llm_checksum(result.model) == before
    changed = [n for n, p in result.model.bridge.named_parameters() if not torch.equal(p, bridge_before[n])]
    assert changed and any(not n.startswith("projector.") for n in changed)
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "run" / "final"))
    assert _llm_checksum(reloaded) == before
    with open(tmp_path / "run" / "log.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert len(records) == 3
    if name == "moe":  # the load-balancing term and the tokens each expert received, every step
        assert all(record["aux_losses"]["moe_aux_loss"] > 0 for record in records)
        loads = records[0]["moe_tokens_per_expert"]
        assert len(loads) == 2 and all(len(layer) == 3 for layer in loads)
        attended = round(records[0]["tokens_per_s"] * records[0]["seconds"])  # positions through the LLM
        assert sum(loads[0]) == sum(loads[1]) == 2 * attended  # every attended token goes to top_k = 2 experts


@pytest.fixture(scope="module")
def smollm2_with_mlp(tokenizer_dir):
    """The bundled SmolLM2 (real weights) behind a tiny encoder, with the default mlp bridge."""
    config = tiny_model_config(tokenizer_dir, 0)
    config["llm"] = {"type": "smollm2"}
    torch.manual_seed(0)
    return MultimodalModel.from_config(config)


@pytest.mark.parametrize("name", FUSION)
def test_defaults_build_on_the_bundled_smollm2_and_start_as_it(smollm2_with_mlp, name):
    base = smollm2_with_mlp
    llm = copy.deepcopy(base.llm)
    bridge = build_bridge({"type": name}, base.vision.feature_dim, llm.hidden_size)
    bridge.attach(llm)
    model = MultimodalModel(base.vision, bridge, llm, dataclasses.replace(base.config, bridge={"type": name})).eval()
    ids = llm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits[..., :expected.shape[-1]]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert llm.tokenizer.decode([int(got[0, -1].argmax())]).strip() == "Paris"
    llm_size = sum(parameter.numel() for parameter in llm.parameters())
    inside = sum(parameter.numel() for n, parameter in bridge.named_parameters() if not n.startswith("projector."))
    layers = len(llm.decoder_layers())
    if name == "visual_expert":  # QKV, O and FFN copies in all 30 layers: about the LLM's size minus embeddings
        assert len(bridge.layers) == layers and 0.5 * llm_size < inside < llm_size
    elif name == "mma":  # LaVIN's point: a tiny trainable part (about 1% of the LLM)
        assert len(bridge.adapters) == 2 * layers and inside < 0.015 * llm_size
    elif name == "gated_xattn":  # a block in front of every layer, the gates closed
        assert len(bridge.blocks) == layers and all(float(b.alpha_attn.detach()) == 0 for b in bridge.blocks.values())
    else:  # 4 experts in every other layer
        assert sorted(map(int, bridge.moe_layers)) == list(range(0, layers, 2))
        assert bridge.inactive_parameters_per_token() > 0


@pytest.mark.parametrize("name", ["visual_expert", "moe"])
def test_training_from_the_feature_cache_matches_pixels(tokenizer_dir, tmp_path, name):
    data = write_shape_dataset(str(tmp_path / "shapes"), 8, seed=3)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    stage = {"name": "s", "train": {"bridge": "full"}, "lr": 1e-2, "steps": 3, "batch_size": 4, "precision": "fp32"}

    def run(output: str, cache: str | None) -> RunConfig:
        return RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=FUSION[name]), stages=[stage],
                         output_dir=str(tmp_path / output), seed=0,
                         data={"sources": [{"path": data}], "max_length": 128, "feature_cache": cache})

    plain = train(run("plain", None), progress=False)
    cached = train(run("cached", str(tmp_path / "cache")), progress=False)
    assert os.listdir(tmp_path / "cache")
    # the cache encodes several images per call, training fewer: rounding may differ in the last bits
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-5, rel=0)


@pytest.mark.parametrize("name", FUSION)
def test_lora_on_the_llm_composes_with_the_parts_inside_it(tokenizer_dir, tmp_path, name):
    model = build(tokenizer_dir, FUSION[name])
    waken(model)
    stage = StageConfig(name="s", train={"bridge": "full", "llm": {"mode": "lora", "r": 4}})
    apply_stage(model, stage, log=False)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(n.startswith("llm.") for n in lora)
    with torch.no_grad():
        for n, parameter in model.named_parameters():
            if "lora_B" in n:
                parameter.normal_(std=0.1)  # LoRA's B starts at zero; make the adapters matter
    model.train()
    batch = image_batch(model)
    model(**batch).loss.backward()
    # a MoE layer's dense FFN (and LoRA on it) is idle once its experts route: no gradient reaches it
    idle = tuple(f".layers.{index}.mlp." for index in getattr(model.bridge, "moe_layers", {}))
    for n, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert (parameter.grad is None) == (bool(idle) and any(part in n for part in idle)), n
    model.eval()
    model.save_pretrained(str(tmp_path))
    loaded = MultimodalModel.from_pretrained(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    settings = {"max_new_tokens": 6, "eos_token_id": []}
    assert torch.equal(loaded.generate(batch["input_ids"], pixel_values=batch["pixel_values"], **settings),
                       loaded.generate(batch["input_ids"], pixel_values=batch["pixel_values"], use_cache=False,
                                       **settings))
