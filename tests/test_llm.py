"""The LLM adapter: hooks for fusion bridges (layer replacement, the per-call FusionCall) and the bundled SmolLM2."""

from __future__ import annotations

import torch
from torch import nn

from conftest import image_prompt
from mmbridge.model.llm import build_llm


class _Recorder(nn.Module):
    """Wraps a decoder layer and records the call it sees."""

    def __init__(self, layer: nn.Module, owner) -> None:
        super().__init__()
        self.layer, self.owner, self.seen = layer, [owner], []

    def forward(self, hidden_states, *args, **kwargs):
        self.seen.append(self.owner[0].context)
        return self.layer(hidden_states, *args, **kwargs)


def test_replaced_layer_sees_the_calls_image_mask(make_model):
    model = make_model()
    ids = image_prompt(model, [5, 6, 7])
    pixels = torch.randn(1, 3, 16, 16)
    expected = model(ids, pixel_values=pixels).logits
    original = model.llm.decoder_layers()[1]
    recorder = _Recorder(original, model.llm)
    assert model.llm.replace_layer(1, recorder) is original
    logits = model(ids, pixel_values=pixels).logits
    assert torch.equal(logits, expected)  # a pass-through wrapper changes nothing
    (seen,) = recorder.seen
    assert torch.equal(seen.image_mask, ids == model.image_token_id) and not seen.training
    model(ids, pixel_values=pixels, labels=ids)
    assert recorder.seen[-1].training  # labels given: modules keep what training_outputs reads
    assert model.llm.context is None  # the call lives only while the LLM runs


def test_bundled_smollm2_loads_offline_with_its_chat_template():
    llm = build_llm({"type": "smollm2"})
    assert type(llm.model).__name__ == "LlamaForCausalLM" and llm.hidden_size == 576
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    ids = llm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, _ = llm(llm.embed_tokens(ids))
        next_id = int(llm.logits(hidden[:, -1]).argmax())
    assert llm.tokenizer.decode([next_id]).strip() == "Paris"  # real pretrained weights, not random


def test_attn_implementation_is_chosen_and_survives_save_and_load(make_model, tmp_path):
    sdpa = make_model()
    eager = make_model(llm={"attn_implementation": "eager"})
    assert sdpa.llm.config._attn_implementation == "sdpa" and eager.llm.config._attn_implementation == "eager"
    ids = image_prompt(sdpa, [5, 6, 7])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected, logits = sdpa(ids, pixel_values=pixels).logits, eager(ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)  # the same weights, another kernel
    eager.save_pretrained(str(tmp_path / "eager"))
    from mmbridge.model.multimodal import MultimodalModel

    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "eager"))
    assert reloaded.llm.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(reloaded(ids, pixel_values=pixels).logits, logits)


def test_the_adapter_base_imports_neither_loader_nor_seq2seq():
    """``base.py`` ← ``seq2seq.py`` ← ``hf.py`` runs one way: ``export_config`` takes its config from
    ``hf_config.py`` (base → hf → seq2seq → base was an import circle)."""
    from test_import_layers import imported_modules

    imported = imported_modules("mmbridge/model/llm/base.py")
    assert not {"mmbridge.model.llm.hf", "mmbridge.model.llm.seq2seq"} & imported, imported
    assert "mmbridge.model.llm.hf_config" in imported
    assert not {"mmbridge.model.llm.base", "mmbridge.model.llm.hf", "mmbridge.model.llm.seq2seq"} \
        & imported_modules("mmbridge/model/llm/hf_config.py")
