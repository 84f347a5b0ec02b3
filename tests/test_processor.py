"""Processor: chat-template rendering, assistant-only labels, image token expansion, truncation, prompts."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmbridge.data import ImageTokens, ModelText, Processor, Sample, SampleError, TextSettings, VideoSettings
from mmbridge.data.collate import IGNORE_INDEX
from mmbridge.model.vision import ImageTransform
from mmbridge.testing import BOS_TEMPLATE, CHATML_TEMPLATE, shape_image, tiny_tokenizer

TOKENS_PER_IMAGE = 4


def make_tokenizer(directory, template: str = CHATML_TEMPLATE):
    tokenizer = tiny_tokenizer(str(directory), chat_template=template)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("bos"), BOS_TEMPLATE)


def make_processor(tokenizer, **settings) -> Processor:
    """A processor with the given :class:`TextSettings` fields."""
    return Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(TOKENS_PER_IMAGE),
                     text_settings=TextSettings(**settings))


def conversation(*turns: str) -> list[dict]:
    """Alternating user/assistant turns, starting with the user."""
    return [{"role": ("user", "assistant")[index % 2], "content": text} for index, text in enumerate(turns)]


def image_sample(*turns: str, image_count: int = 1, sample_id: str = "s1") -> tuple[Sample, list[Image.Image]]:
    images = [shape_image("red", "circle", 16, seed=index) for index in range(image_count)]
    return Sample(id=sample_id, conversation=conversation(*turns), images=["unused.png"] * image_count), images


def labelled_text(tokenizer, example: dict) -> str:
    keep = example["labels"] != IGNORE_INDEX
    return tokenizer.decode(example["input_ids"][keep])


def test_chatml_single_turn_labels_only_the_answer_and_end_token(chatml):
    processor = make_processor(chatml)
    example = processor(Sample("a", conversation("Describe the picture.", "A red circle.")), images=[])
    assert labelled_text(chatml, example) == "A red circle.<|im_end|>"
    full = chatml.decode(example["input_ids"])
    assert full.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")  # default system prompt
    assert example["pixel_values"].shape == (0, 3, 16, 16)


def test_labels_equal_input_ids_where_set(chatml):
    example = make_processor(chatml)(Sample("a", conversation("Which shape?", "A square.")), images=[])
    keep = example["labels"] != IGNORE_INDEX
    assert keep.any()  # the answer is labelled (an empty selection would make the next check vacuous)
    assert torch.equal(example["labels"][keep], example["input_ids"][keep])
    assert example["input_ids"].dtype == torch.long and example["labels"].shape == example["input_ids"].shape


def test_chatml_multi_turn_labels_every_answer(chatml):
    processor = make_processor(chatml)
    sample = Sample("m", conversation("What colour is it?", "It is blue.", "Which shape is it?", "A square."))
    example = processor(sample, images=[])
    assert labelled_text(chatml, example) == "It is blue.<|im_end|>A square.<|im_end|>"
    labelled_runs = _runs(example["labels"] != IGNORE_INDEX)
    assert len(labelled_runs) == 2  # the second user turn between the answers is not labelled


def test_bos_template_labels_answers_and_eos_not_bos(llama2):
    processor = make_processor(llama2)
    sample = Sample("b", conversation("What colour is it?", "It is blue.", "Which shape is it?", "A square."))
    example = processor(sample, images=[])
    assert example["input_ids"][0] == llama2.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert labelled_text(llama2, example) == " It is blue.</s> A square.</s>"
    assert (example["input_ids"] == llama2.bos_token_id).sum() == 1  # no second BOS from the tokenizer


def test_system_prompt_setting_is_rendered_and_not_labelled(chatml):
    processor = make_processor(chatml, system_prompt="Answer briefly.")
    example = processor(Sample("s", conversation("Which shape?", "A circle.")), images=[])
    full = chatml.decode(example["input_ids"])
    assert full.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert "helpful assistant" not in full
    assert labelled_text(chatml, example) == "A circle.<|im_end|>"
    assert processor.settings() == {"max_length": 2048, "system_prompt": "Answer briefly."}


def test_system_turn_in_the_sample_wins_over_the_setting(chatml):
    processor = make_processor(chatml, system_prompt="Answer briefly.")
    turns = [{"role": "system", "content": "Be precise."}] + conversation("Which shape?", "A circle.")
    full = chatml.decode(processor(Sample("s", turns), images=[])["input_ids"])
    assert "Be precise." in full and "Answer briefly." not in full


def test_image_placeholder_expands_in_place_and_is_not_labelled(chatml):
    processor = make_processor(chatml)
    sample, images = image_sample("<image>\nWhat colour is the shape?", "It is red.")
    example = processor(sample, images=images)
    image_positions = (example["input_ids"] == processor.image_token_id).nonzero().flatten().tolist()
    assert len(image_positions) == TOKENS_PER_IMAGE
    assert image_positions == list(range(image_positions[0], image_positions[0] + TOKENS_PER_IMAGE))
    before = chatml.decode(example["input_ids"][:image_positions[0]])
    assert before.endswith("<|im_start|>user\n")
    assert (example["labels"][image_positions] == IGNORE_INDEX).all()
    assert labelled_text(chatml, example) == "It is red.<|im_end|>"
    assert example["pixel_values"].shape == (1, 3, 16, 16)


def test_two_images_expand_to_two_runs(chatml):
    processor = make_processor(chatml)
    sample, images = image_sample("<image> and <image>: same colour?", "yes", image_count=2)
    example = processor(sample, images=images)
    runs = _runs(example["input_ids"] == processor.image_token_id)
    assert [length for _, length in runs] == [TOKENS_PER_IMAGE, TOKENS_PER_IMAGE]
    assert example["pixel_values"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("placeholders, image_count", [(2, 1), (1, 2), (0, 1)])
def test_placeholder_image_count_mismatch_names_id_and_counts(chatml, placeholders, image_count):
    processor = make_processor(chatml)
    sample, images = image_sample("<image>" * placeholders + "What is it?", "A circle.",
                                  image_count=image_count, sample_id="mismatch-7")
    with pytest.raises(ValueError) as raised:
        processor(sample, images=images)
    message = str(raised.value)
    assert "mismatch-7" in message
    assert f"{placeholders} <image>" in message and f"{image_count} image" in message


def test_placeholder_in_assistant_turn_is_rejected(chatml):
    sample = Sample("answer-img", conversation("Draw it.", "<image>"), images=["x.png"])
    with pytest.raises(ValueError, match="answer-img.*assistant"):
        make_processor(chatml)(sample, images=[shape_image("red", "circle", 16)])


def test_truncation_through_image_tokens_is_an_error(chatml):
    processor = make_processor(chatml, max_length=20)  # the system prompt alone is ~22 tokens
    sample, images = image_sample("<image>\nWhat colour is the shape?", "It is red.", sample_id="long-1")
    with pytest.raises(ValueError) as raised:
        processor(sample, images=images)
    message = str(raised.value)
    needed = len(make_processor(chatml)(sample, images=images)["input_ids"])
    assert "long-1" in message and "20" in message and str(needed) in message


def test_truncation_keeping_images_cuts_text_from_the_right(chatml):
    sample, images = image_sample("<image>\nWhat colour is the shape?", "It is red.", "Which shape is it?",
                                  "A circle.")
    full = make_processor(chatml)(sample, images=images)
    first_answer_end = _runs(full["labels"] != IGNORE_INDEX)[0]
    cut = first_answer_end[0] + first_answer_end[1] + 3
    truncated = make_processor(chatml, max_length=cut)(sample, images=images)
    assert len(truncated["input_ids"]) == cut
    assert torch.equal(truncated["input_ids"], full["input_ids"][:cut])
    assert torch.equal(truncated["labels"], full["labels"][:cut])
    assert labelled_text(chatml, truncated) == "It is red.<|im_end|>"
    assert (truncated["input_ids"] == make_processor(chatml).image_token_id).sum() == TOKENS_PER_IMAGE


def test_truncation_leaving_no_answer_is_an_error(chatml):
    sample = Sample("no-answer-left", conversation("Describe the picture in detail. " * 4, "A circle."))
    with pytest.raises(ValueError, match="no-answer-left"):
        make_processor(chatml, max_length=40)(sample, images=[])


def test_empty_conversation_is_an_error(chatml):
    with pytest.raises(ValueError, match="empty-1.*empty"):
        make_processor(chatml)(Sample("empty-1", []), images=[])


def test_text_only_sample(chatml):
    example = make_processor(chatml)(Sample("t", conversation("Say yes.", "yes")))  # loads no image files
    assert (example["input_ids"] == make_processor(chatml).image_token_id).sum() == 0
    assert example["pixel_values"].shape[0] == 0
    assert example["id"] == "t"


def test_template_without_stable_prefixes_still_labels_answers(tmp_path):
    # renders a closing token only when no generation prompt is asked, so prefixes differ from the full text
    template = CHATML_TEMPLATE + "{% if not add_generation_prompt %}{{ '<|endoftext|>' }}{% endif %}"
    tokenizer = make_tokenizer(tmp_path, template)
    sample = Sample("p", conversation("What colour is it?", "It is blue.", "Which shape is it?", "A square."))
    example = make_processor(tokenizer)(sample, images=[])
    # the first answer is found by its text and closed with the template's end-of-turn token;
    # the last one spans to the end of the rendering, closing token included
    assert labelled_text(tokenizer, example) == "It is blue.<|im_end|>A square.<|im_end|>\n<|endoftext|>"


def test_prompt_ends_with_assistant_header_and_holds_image_tokens(chatml):
    processor = make_processor(chatml)
    ids = processor.prompt("What colour is the shape?", num_images=1)
    assert chatml.decode(ids).endswith("What colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert (ids == processor.image_token_id).sum() == TOKENS_PER_IMAGE
    assert ids.dtype == torch.long and ids.dim() == 1


def test_prompt_keeps_given_placeholders_and_history(chatml):
    processor = make_processor(chatml)
    history = conversation("<image>\nWhat colour?", "Red.")
    ids = processor.prompt("Which shape?", num_images=1, history=history)
    text = chatml.decode(ids)
    assert text.count("Red.<|im_end|>") == 1 and text.endswith("Which shape?<|im_end|>\n<|im_start|>assistant\n")
    assert (ids == processor.image_token_id).sum() == TOKENS_PER_IMAGE
    with pytest.raises(ValueError, match="2 <image>.*1 image"):
        processor.prompt("<image><image> compare", num_images=1)


def test_encode_images_accepts_paths_and_odd_modes(chatml, tmp_path):
    path = tmp_path / "grey.png"
    shape_image("blue", "square", 20).convert("L").save(path)
    rgba = shape_image("red", "circle", 24).convert("RGBA")
    pixels = make_processor(chatml).encode_images([str(path), rgba])
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32


def test_tokenizer_without_image_token_is_rejected(tmp_path):
    tokenizer = tiny_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="add_tokens"):
        make_processor(tokenizer)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool tensor."""
    runs, start = [], None
    for position, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            runs.append((start, position - start))
            start = None
    return runs


def test_plain_template_is_image_then_reply(chatml):
    """LLaVA's pretraining format: no system prompt, chat markup or user text; the reply and a newline labelled."""
    processor = make_processor(chatml, system_prompt="You are a helpful assistant.", template="plain")
    sample = Sample(id="p", images=["a.png"], conversation=conversation("<image>\nDescribe it.", " A red circle. "))
    example = processor(sample, pixels=False)
    reply = chatml("A red circle.\n", add_special_tokens=False)["input_ids"]
    image_id = processor.image_token_id
    assert example["input_ids"].tolist() == [image_id] * TOKENS_PER_IMAGE + reply
    assert example["labels"].tolist() == [IGNORE_INDEX] * TOKENS_PER_IMAGE + reply


def test_plain_template_adds_the_tokenizers_bos(llama2):
    processor = make_processor(llama2, template="plain")
    example = processor(Sample(id="p", images=["a.png"], conversation=conversation("<image>", "A cat.")), pixels=False)
    assert example["input_ids"][0] == llama2.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert example["input_ids"][1] == processor.image_token_id


@pytest.mark.parametrize("turns, images", [(("<image>\nHi", "A.", "More?", "B."), 1), (("<image><image>", "A."), 2)])
def test_plain_template_refuses_other_conversations(chatml, turns, images):
    processor = make_processor(chatml, template="plain")
    sample = Sample(id="multi", images=[f"{index}.png" for index in range(images)], conversation=conversation(*turns))
    with pytest.raises(SampleError, match="sample 'multi': template 'plain' takes one user turn with one image"):
        processor(sample, pixels=False)


def test_unknown_template_is_an_error(chatml):
    from mmbridge.data import DataConfig

    with pytest.raises(ValueError, match=r"template must be one of \('chat', 'plain'\), got 'alpaca'"):
        make_processor(chatml, template="alpaca")
    with pytest.raises(ValueError, match="data template must be one of"):
        DataConfig(sources=[{"path": "x.json"}], template="alpaca")


def test_grouped_settings_read_back_under_the_flat_names(chatml):
    processor = Processor(chatml, ImageTransform(size=(16, 16)), ImageTokens(3, token_id=7),
                          text_settings=TextSettings(max_length=64, system_prompt="Hi.", label_all=True,
                                                     box_format="qwen"),
                          model_text=ModelText(chunk_token="<|endofchunk|>"),
                          video_settings=VideoSettings(as_media=True, max_frames=3, stride=2))
    assert (processor.max_length, processor.system_prompt, processor.label_all, processor.box_format) == \
        (64, "Hi.", True, "qwen")
    assert (processor.template, processor.prefix_lm, processor.text) == ("chat", False, True)
    assert (processor.tokens_per_image, processor.image_token, processor.image_token_id) == (3, "<image>", 7)
    assert processor.placeholder_id == chatml.convert_tokens_to_ids("<image>") != 7
    assert (processor.encoder_decoder, processor.chunk_token, processor.bridge_tokenizer) == \
        (False, "<|endofchunk|>", None)
    assert (processor.video_as_media, processor.max_video_frames, processor.video_stride) == (True, 3, 2)
    assert processor.video_frames(10) == [0, 4, 8]  # every 2nd of 10 frames, then 3 of those spread evenly
    assert processor.settings() == {"max_length": 64, "system_prompt": "Hi."}


def test_settings_are_checked_where_they_are_grouped(chatml):
    with pytest.raises(ValueError, match="tokens_per_image must be at least 1, got 0"):
        ImageTokens(0)
    with pytest.raises(ValueError, match="max_length must be at least 1, got 0"):
        TextSettings(max_length=0)
    with pytest.raises(ValueError, match="video_stride must be >= 1, got 0"):
        VideoSettings(stride=0)
    with pytest.raises(ValueError, match="prefix_lm .* needs an encoder-decoder LLM"):
        make_processor(chatml, prefix_lm=True)
    with pytest.raises(ValueError, match="template 'plain' is for decoder-only LLMs"):
        Processor(chatml, ImageTransform(size=(16, 16)), ImageTokens(4), text_settings=TextSettings(template="plain"),
                  model_text=ModelText(encoder_decoder=True))
