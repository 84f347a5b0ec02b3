"""Shared fixtures: a tiny BPE tokenizer on disk and tiny random multimodal models (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_bert, tiny_llm_config, tiny_model_config, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# MMBRIDGE_TEST_THREADS runs the suite with another thread count (CI does: results must not depend on it)
torch.set_num_threads(int(os.environ.get("MMBRIDGE_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    """A tiny BERT checkpoint with its WordPiece tokenizer (:func:`mmbridge.testing.tiny_bert`)."""
    return tiny_bert(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture()
def make_model(tokenizer_dir):
    """``make_model(bridge=..., vision=..., llm=...)`` → a fresh tiny MultimodalModel (seeded)."""

    def build(**parts) -> MultimodalModel:
        torch.manual_seed(0)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1  # + the <image> token
        model = MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, **parts))
        return model.eval()

    return build


def image_prompt(model: MultimodalModel, text_ids: list[int], images: int = 1) -> torch.Tensor:
    """``[1, L]`` ids: text, then ``images`` runs of image tokens, then text again."""
    run = [model.image_token_id] * model.tokens_per_image
    return torch.tensor([text_ids + run * images + text_ids])


def left_padded_pair(slots: int, image_token_id: int, pad_id: int,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two sequences, the first left-padded by 3, each holding one run of ``slots`` image tokens;
    labels on the last 3 tokens. Returns ``input_ids``, ``attention_mask``, ``labels`` ``[2, L]``."""
    text = torch.randint(5, image_token_id, (2, 8), generator=generator)
    image = torch.full((slots,), image_token_id)
    first = torch.cat([torch.full((3,), pad_id), text[0, :2], image, text[0, 5:]])
    second = torch.cat([text[1, :5], image, text[1, 5:]])
    input_ids = torch.stack([first, second])  # [2, L]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_with_llm(tokenizer_dir: str, bridge: dict, family: str = "llama") -> MultimodalModel:
    """A fresh tiny model (seeded) with ``bridge`` on an LLM of ``family`` (llama, qwen2…)."""
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    llm = {"hf_config": tiny_llm_config(vocab, model_type=family)}
    return MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, bridge=bridge, llm=llm)).eval()


def waken(model: MultimodalModel, scale: float = 0.2) -> None:
    """Move every bridge weight away from its init (zero up-projections, expert copies), so the parts inside
    the LLM change the output and a test of them can fail."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.bridge.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def image_batch(model: MultimodalModel, left_pad: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts: text, one image, text; the first row left-padded by ``left_pad``; labels on the last 3."""
    generator = torch.Generator().manual_seed(2)
    run = torch.full((model.tokens_per_image,), model.image_token_id)
    rows = [torch.cat([torch.randint(5, 200, (3,), generator=generator), run,
                       torch.randint(5, 200, (4,), generator=generator)]) for _ in range(2)]
    input_ids = torch.stack(rows)
    attention_mask = torch.ones_like(input_ids)
    if left_pad:
        input_ids = torch.cat([torch.full((2, left_pad), model.tokenizer.pad_token_id), input_ids], 1)
        attention_mask = torch.cat([torch.zeros(2, left_pad, dtype=torch.long), attention_mask], 1)
        input_ids[1, :left_pad] = torch.randint(5, 200, (left_pad,), generator=generator)  # row 1 unpadded
        attention_mask[1] = 1
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    pixel_values = torch.randn(2, 3, 16, 16, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}
