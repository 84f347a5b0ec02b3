"""Shared fixtures: a tiny BPE tokenizer on disk and tiny random multimodal models (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    tiny_tokenizer(directory)
    return directory


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
