"""Q-Former family bridges (qformer, instruct_qformer, llama_vid).

Tiny random parts: the conftest CLIP tower (16 tokens of width 32 after dropping CLS), a tiny
Llama, and a tiny BERT (hidden 32, 2 layers) with a WordPiece tokenizer (the ``bert_dir`` fixture).
BLIP-2 stage 1 (ITC/ITM/ITG) is tested in ``test_qformer_stage1.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel

from mmbridge.config import RunConfig
from mmbridge.data import ImageTokens, Processor, Sample, collate
from mmbridge.data.bridge_inputs import BridgeInputs
from mmbridge.model.bridges import BRIDGES
from mmbridge.model.bridges.llama_vid import context_attention, pool_tokens
from mmbridge.model.bridges.qformer import QFormerBridgeConfig, build_qformer, resolve_config
from mmbridge.model.grid import FeatureGrid
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import BERT_VOCAB as VOCAB
from mmbridge.testing import shape_image, write_shape_dataset
from mmbridge.train import StageConfig, apply_stage

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "num_queries": 4,
        "vocab_size": len(VOCAB), "max_position_embeddings": 64}
BRIDGE_TYPES = ("qformer", "instruct_qformer", "llama_vid")
TEXT = [5, 6, 7]
GRID = FeatureGrid(3, 3)  # the features' grid in the bridge-level tests


def _spec(kind: str, bert_dir: str, **extra) -> dict:
    text = {"tokenizer": bert_dir} if kind != "qformer" else {}
    return {"type": kind, **TINY, **text, **extra}


def _inputs(model: MultimodalModel, images: int = 1) -> dict:
    """``[1, L]`` ids with ``images`` runs of visual tokens, pixels and (for text bridges) instruction ids."""
    run = [model.image_token_id] * model.tokens_per_image
    ids = torch.tensor([TEXT + run * images + TEXT])
    pixels = torch.randn(images, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "pixel_values": pixels}
    if model.bridge.tokenizer is not None:
        encoded = model.bridge.tokenizer(["what colour is the shape ?"] * images, return_tensors="pt")
        inputs.update(bridge_inputs=BridgeInputs(encoded["input_ids"], encoded["attention_mask"]))
    return inputs


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# -- shapes and structure ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra,tokens", [("qformer", {}, 4), ("instruct_qformer", {}, 4),
                                               ("llama_vid", {}, 2), ("llama_vid", {"content_tokens": 4}, 5)])
def test_output_shapes_and_token_counts(bert_dir, kind, extra, tokens):
    bridge = BRIDGES.build(_spec(kind, bert_dir, **extra), 24, 40)
    features = torch.randn(3, 49, 24)  # a 7x7 grid
    text = torch.randint(6, len(VOCAB), (3, 5))
    output = bridge(features, FeatureGrid(7, 7), BridgeInputs(text, torch.ones_like(text)))
    assert output.shape == (3, tokens, 40)
    assert bridge.num_tokens(FeatureGrid(7, 7)) == bridge.num_tokens(FeatureGrid(3, 3)) == tokens
    assert bridge.token_grid(FeatureGrid(7, 7)) is None  # queries have no place in the image


def test_cross_attention_every_frequency_layers():
    bridge = BRIDGES.build({"type": "qformer", **{**TINY, "num_layers": 5}, "cross_attention_frequency": 2}, 24, 40)
    assert [layer.cross_attention is not None for layer in bridge.qformer.layers] == [True, False, True, False, True]
    assert all(layer.cross_attention.key.in_features == 24 for layer in bridge.qformer.layers[::2])
    assert bridge.qformer.embeddings.word_embeddings is None and bridge.qformer.layers[0].text_ffn is None


@pytest.mark.parametrize("kind", ["instruct_qformer", "llama_vid"])
def test_instruction_bridges_need_text(bert_dir, kind):
    bridge = BRIDGES.build(_spec(kind, bert_dir), 24, 40)
    with pytest.raises(ValueError, match=r"bridge_inputs=BridgeInputs\(text_ids"):
        bridge(torch.randn(2, 9, 24), GRID)
    one = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="for 1 image"):
        bridge(torch.randn(2, 9, 24), GRID, BridgeInputs(one, one))


def test_instruction_changes_the_queries(bert_dir):
    bridge = BRIDGES.build(_spec("instruct_qformer", bert_dir), 24, 40).eval()
    features = torch.randn(1, 9, 24)
    first = bridge(features, GRID, BridgeInputs(torch.tensor([[2, 9, 10, 3]]), torch.ones(1, 4, dtype=torch.long)))
    second = bridge(features, GRID, BridgeInputs(torch.tensor([[2, 20, 21, 3]]), torch.ones(1, 4, dtype=torch.long)))
    assert (first - second).abs().max() > 1e-4
    padded = bridge(features, GRID, BridgeInputs(torch.tensor([[2, 9, 10, 3, 0, 0]]),
                                                 torch.tensor([[1, 1, 1, 1, 0, 0]])))
    torch.testing.assert_close(padded, first, atol=1e-5, rtol=0)  # padding is invisible


def test_llama_vid_context_and_content_tokens():
    queries, features = torch.randn(2, 3, 8), torch.randn(2, 16, 8)
    weights = (queries @ features.transpose(1, 2) / 8 ** 0.5).softmax(-1)  # [B, Q, N]
    expected = torch.stack([sum(weights[b, q] @ features[b] for q in range(3)) / 3 for b in range(2)])
    torch.testing.assert_close(context_attention(queries, features), expected)
    grid = pool_tokens(features, FeatureGrid(4, 4), 4)  # 4x4 grid → 2x2 cells
    cell = features[0].view(4, 4, 8)[:2, :2].reshape(4, 8).mean(0)
    torch.testing.assert_close(grid[0, 0], cell)
    torch.testing.assert_close(pool_tokens(features, FeatureGrid(4, 4), 1)[:, 0], features.mean(1))
    assert pool_tokens(features, FeatureGrid(4, 4), 3).shape == (2, 3, 8)  # not square: 1-D pooling
    wide = pool_tokens(features, FeatureGrid(2, 8), 4)  # a 2x8 grid pools to 2x2 cells of 1x4
    torch.testing.assert_close(wide[0, 1], features[0].view(2, 8, 8)[0, 4:].mean(0))
    sequence = pool_tokens(features, FeatureGrid.sequence(16), 4)  # no grid: along the sequence
    torch.testing.assert_close(sequence[0, 1], features[0, 4:8].mean(0))


# -- initialisation from BERT / stage 1 --------------------------------------------------------
def test_text_path_equals_bert_and_ffns_start_equal(bert_dir):
    config = resolve_config(QFormerBridgeConfig(init_from=bert_dir, num_queries=4))
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (32, 2, len(VOCAB))
    qformer = build_qformer(config, 24, text_input=True).eval()
    bert = BertModel.from_pretrained(bert_dir).eval()
    ids = torch.tensor([[2, 9, 10, 11, 3, 0], [2, 15, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = qformer(text_ids=ids, text_mask=mask, use_queries=False)
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
    layer = qformer.layers[1]
    assert torch.equal(layer.query_ffn.up.weight, layer.text_ffn.up.weight)
    assert torch.equal(layer.self_attention.query.weight, bert.encoder.layer[1].attention.self.query.weight)


def test_bundled_minilm_initialises_the_qformer():
    bridge = BRIDGES.build({"type": "qformer", "init_from": "minilm", "num_queries": 8}, 24, 40)
    spec = bridge.export_config()
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.init_from) == (384, 6, 12, None)
    assert bridge(torch.randn(1, 9, 24), GRID).shape == (1, 8, 40)


# -- inside MultimodalModel --------------------------------------------------------------------
@pytest.mark.parametrize("kind", BRIDGE_TYPES)
def test_gradients_reach_exactly_the_bridge(make_model, bert_dir, kind):
    model = make_model(bridge=_spec(kind, bert_dir))
    apply_stage(model, StageConfig(name="align", train={"bridge": "full"}), log=False)
    bridge_names = {name for name, _ in model.named_parameters() if name.startswith("bridge.")}
    assert _trainable(model) == bridge_names
    inputs = _inputs(model)
    output = model(**inputs, labels=inputs["input_ids"])
    output.loss.backward()
    with_grad = {name for name, parameter in model.named_parameters()
                 if parameter.grad is not None and parameter.grad.abs().sum() > 0}
    # the last layer's text outputs are discarded (only queries leave the bridge), so its text FFN gets
    # no gradient; transformers' InstructBLIP holds the same unused weights, kept for exact interop
    unused = {name for name in bridge_names if name.startswith("bridge.qformer.layers.1.text_ffn.")}
    assert with_grad == bridge_names - unused


@pytest.mark.parametrize("kind", BRIDGE_TYPES)
def test_trainable_sets_per_stage(make_model, bert_dir, kind):
    model = make_model(bridge=_spec(kind, bert_dir))
    bridge = {name for name, _ in model.named_parameters() if name.startswith("bridge.")}
    apply_stage(model, StageConfig(name="align", train={"bridge": "full"}), log=False)
    assert _trainable(model) == bridge
    apply_stage(model, StageConfig(name="instruct", train={"bridge": "full", "llm": {"mode": "lora", "r": 2}}),
                log=False)
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    assert lora and _trainable(model) == bridge | lora
    apply_stage(model, StageConfig(name="top", train={"bridge": {"mode": "partial", "layers": 1}}), log=False)
    assert _trainable(model) == {name for name in bridge if name.startswith("bridge.qformer.layers.1.")}


@pytest.mark.parametrize("kind", BRIDGE_TYPES)
def test_generation_with_and_without_cache_agree(make_model, bert_dir, kind):
    model = make_model(bridge=_spec(kind, bert_dir))
    inputs = _inputs(model, images=2)
    ids, extra = inputs.pop("input_ids"), {k: v for k, v in inputs.items() if k.startswith("bridge_")}
    cached = model.generate(ids, pixel_values=inputs["pixel_values"], max_new_tokens=6, use_cache=True, **extra)
    uncached = model.generate(ids, pixel_values=inputs["pixel_values"], max_new_tokens=6, use_cache=False, **extra)
    assert cached.shape == (1, 6) and torch.equal(cached, uncached)


@pytest.mark.parametrize("kind", BRIDGE_TYPES)
def test_save_load_identical_logits_and_bridge_tokenizer(make_model, bert_dir, tmp_path, kind):
    model = make_model(bridge=_spec(kind, bert_dir))
    inputs = _inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["model"]["bridge"]
    assert saved["type"] == kind and saved["tokenizer"] is None and saved["hidden_size"] == 32
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    has_tokenizer = kind != "qformer"
    assert (tmp_path / "saved" / "bridge_tokenizer").is_dir() == has_tokenizer
    if has_tokenizer:
        assert reloaded.bridge.tokenizer.get_vocab() == model.bridge.tokenizer.get_vocab()
        assert reloaded.processor().bridge_tokenizer is reloaded.bridge.tokenizer


# -- processor, collate, chat, training ------------------------------------------------------------
def test_processor_writes_the_user_turn_per_image(make_model, bert_dir):
    model = make_model(bridge=_spec("instruct_qformer", bert_dir))
    processor = model.processor()
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                          {"role": "assistant", "content": "It is red."},
                          {"role": "user", "content": "Which shape? <image> Answer using a single word or phrase."},
                          {"role": "assistant", "content": "A circle."}])
    example = processor(sample, images=[shape_image("red", "circle", 16), shape_image("blue", "square", 16)])
    tokenizer = model.bridge.tokenizer
    expected = tokenizer(["What colour is the shape?", "Which shape?  Answer using a single word or phrase."],
                         padding=True, return_tensors="pt")
    assert torch.equal(example["bridge_inputs"].text_ids, expected["input_ids"])
    assert torch.equal(example["bridge_inputs"].text_mask, expected["attention_mask"])
    batch = collate([example, processor(Sample("t", sample.conversation[:2]), images=[shape_image("red", "circle")])],
                    processor.pad_token_id)
    assert batch["bridge_inputs"].text_ids.shape[0] == 3 == batch["pixel_values"].shape[0]
    prompt = processor.prompt_inputs("What colour is the shape?", [shape_image("red", "circle", 16)])
    alone = tokenizer(["What colour is the shape?"], return_tensors="pt")["input_ids"]
    assert torch.equal(prompt["bridge_inputs"].text_ids, alone)
    assert "bridge_inputs" not in Processor(processor.tokenizer, processor.transform, ImageTokens(4)).prompt_inputs(
        "x", [shape_image("red", "circle", 16)])


def test_chat_passes_the_instruction_to_the_bridge(make_model, bert_dir):
    model = make_model(bridge=_spec("llama_vid", bert_dir))
    seen = []
    original = model.bridge.forward
    model.bridge.forward = lambda features, grid, inputs=None: seen.append(inputs) or original(features, grid, inputs)
    model.chat("What colour is the shape?", [shape_image("red", "circle", 16)], max_new_tokens=2)
    expected = model.bridge.tokenizer(["What colour is the shape?"], return_tensors="pt")["input_ids"]
    assert torch.equal(seen[0].text_ids, expected)


def test_training_run_with_an_instruction_bridge(tokenizer_dir, bert_dir, tmp_path):
    from transformers import AutoTokenizer

    from mmbridge.testing import tiny_model_config
    from mmbridge.train import train

    data = write_shape_dataset(str(tmp_path / "data"), 8, seed=2, size=16)
    model = tiny_model_config(tokenizer_dir, len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1,
                              bridge=_spec("instruct_qformer", bert_dir))
    stage = {"name": "align", "train": {"bridge": "full"}, "steps": 2, "batch_size": 4, "precision": "fp32"}
    run = RunConfig(model=model, stages=[stage], output_dir=str(tmp_path / "run"),
                    data={"sources": [{"path": data}], "max_length": 128})
    result = train(run, progress=False)
    assert len(result.history) == 2
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "run" / "final"))
    assert reloaded.bridge.tokenizer is not None
