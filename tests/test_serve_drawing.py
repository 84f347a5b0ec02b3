"""``mmbridge serve`` with a model that answers with images: the server's hook draws each complete run of signal tokens
with the model's generator and sends the images after the text as OpenAI image content parts.

A tiny model with an image output side over a tiny random diffusers pipeline, whose head is set so that after the
test's prompt it starts a run of signal tokens; served over real HTTP by uvicorn in a thread of this process."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image

from mmbridge.model.output.render import ImageSettings
from mmbridge.serve import ServeSettings, create_app
from mmbridge.serve.outputs import drawing_hook
from mmbridge.testing import tiny_diffusers_pipeline
from serve_support import MODEL_NAME, ThreadServer

PROMPT = "Draw a red circle."
OUTPUT = {"signal_tokens": 4, "queries": 16, "width": 32, "hidden": 16, "encoder_layers": 1, "decoder_layers": 1,
          "heads": 2, "feed_forward": 32}


@pytest.fixture(scope="module")
def drawing_model(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from mmbridge.model.multimodal import MultimodalModel
    from mmbridge.testing import tiny_model_config

    pipeline = tiny_diffusers_pipeline(str(tmp_path_factory.mktemp("pipeline")))
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    torch.manual_seed(0)
    output = {"image": {**OUTPUT, "generator": {"type": "diffusers", "path": pipeline}}}
    model = MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, output=output)).eval()
    prompt = model.processor().prompt_inputs(PROMPT, [])["input_ids"][None]
    with torch.no_grad():  # after this prompt every logit is 0 but [IMG0]'s: the answer starts a run at once
        last = model(prompt, return_hidden=True).hidden[0, -1]
        model.llm.lm_head.weight.zero_()
        model.output.modalities["image"].head.zero_()
        model.output.modalities["image"].head[0] = 10 * last / last.norm()
    return model


@pytest.fixture(scope="module")
def server(drawing_model):
    settings = ServeSettings(served_model_name=MODEL_NAME, max_image_steps=4, max_image_size=64)
    yield from ThreadServer(create_app(drawing_model, settings, answer_images=drawing_hook(drawing_model))).running()


def _post(server, **body) -> httpx.Response:
    request = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
               "max_tokens": 6, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=120)


def _image(part: dict) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"][len(prefix):])))


def test_an_answer_with_a_run_of_signal_tokens_carries_its_drawn_image(server, drawing_model):
    response = _post(server, modalities=["text", "image"], image={"steps": 2, "size": 32})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    images = [part for part in content if part["type"] == "image_url"]
    text = "".join(part["text"] for part in content if part["type"] == "text")
    assert len(images) == 1 and content[-1] is images[0]  # the image after the text (none here: the run is all)
    drawn = _image(images[0])
    assert drawn.size == (32, 32) and drawn.mode == "RGB"
    answer = drawing_model.chat(PROMPT, [], return_media=True, max_new_tokens=6,
                                image_settings=ImageSettings(steps=2, height=32, width=32))
    assert text == answer.text and len(answer.images) == 1  # what the model answers by itself


def test_a_run_cut_short_by_max_tokens_draws_nothing(server):
    response = _post(server, max_tokens=2)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["choices"][0]["message"]["content"], str)  # text only: no image part


def test_a_text_only_model_has_no_hook(make_model):
    assert drawing_hook(make_model()) is None
