"""WebDataset shards: the MiniWorld writer, reading by scanning (checked against the `webdataset` package), random
access, streaming order with a shuffle buffer, training and exact resume, damaged shards, memory."""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import pickle
import tarfile

import numpy as np
import pytest
import webdataset
from PIL import Image
from transformers import AutoTokenizer

from mmbridge.cli import main
from mmbridge.config import RunConfig
from mmbridge.data import (DataConfig, ImageLoadError, ImageTokens, MixtureDataset, Processor, Sample, SourceConfig,
                           TextSettings)
from mmbridge.data.formats.webdataset import ShardImage, expand_shards, scan_shard
from mmbridge.data.mixture import stream_order
from mmbridge.model.vision import ImageTransform
from mmbridge.testing import tiny_model_config, tiny_tokenizer
from mmbridge.train import train
from mmbridge.worlds.miniworld.writer import write_webdataset


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    tokenizer = tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return Processor(tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                     text_settings=TextSettings(max_length=256))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """30 attribute samples in 3 shards of 10; returns the brace pattern."""
    directory = str(tmp_path_factory.mktemp("shards"))
    write_webdataset("attribute", "train", 30, directory, shard_size=10, progress=False)
    return os.path.join(directory, "attribute-train-{00000..00002}.tar")


def dataset_of(processor, skip: bool = False, **source) -> MixtureDataset:
    return MixtureDataset(DataConfig(sources=[SourceConfig(**source)], skip_bad_samples=skip), processor)


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def jpeg(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# -- writing, and reading back -----------------------------------------------------------------------
def test_cli_writes_shards_the_webdataset_package_reads(processor, tmp_path, capsys):
    out = tmp_path / "captions"
    assert main(["data", "miniworld", "--task", "caption", "--split", "train", "--n", "12", "--out", str(out),
                 "--format", "webdataset", "--shard-size", "5", "--no-progress"]) == 0
    assert "12 caption/train samples in 3 shard(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [f"caption-train-0000{k}.tar" for k in range(3)]  # no temporary left
    pattern = str(out / "caption-train-{00000..00002}.tar")
    reference = list(webdataset.WebDataset(pattern, shardshuffle=False).decode("pil"))
    ours = dataset_of(processor, webdataset=pattern).samples
    assert len(reference) == len(ours) == 12
    for theirs, sample in zip(reference, ours):
        assert theirs["__key__"] == sample.id and theirs["json"]["id"] == sample.id
        assert sample.conversation == [{"role": "user", "content": "<image>"},
                                       {"role": "assistant", "content": theirs["txt"]}]
        assert np.array_equal(np.asarray(sample.image_loader()[0]), np.asarray(theirs["jpg"]))


def test_conversation_json_and_plain_template(processor, shards, tmp_path):
    dataset = dataset_of(processor, webdataset=shards)
    assert len(dataset) == 30 and [len(shard) for shard in dataset.source_shards[0]] == [10, 10, 10]
    assert dataset.source_names == ["attribute-train"]
    first = dataset.samples[0]
    assert first.id == "attribute-train-000000" and first.conversation[0]["content"].startswith("<image>\n")
    example = dataset[0]
    assert example["pixel_values"].shape == (1, 3, 16, 16)
    # a caption under LLaVA's plain template: image tokens, then the caption, which alone is labelled
    path = write_tar(tmp_path / "pairs-00000.tar", [("a.jpg", jpeg()), ("a.txt", b" A red square. ")])
    plain = Processor(processor.tokenizer, ImageTransform(size=(16, 16)), ImageTokens(4),
                      text_settings=TextSettings(max_length=256, template="plain"))
    example = dataset_of(plain, webdataset=path)[0]
    labelled = example["labels"][example["labels"] != -100]
    assert processor.tokenizer.decode(labelled).strip() == "A red square."


def test_random_access_equals_sequential_reading(processor, shards):
    dataset = dataset_of(processor, webdataset=shards)
    sequential = [dataset[index] for index in range(len(dataset))]
    for index in np.random.default_rng(0).permutation(len(dataset)):
        example = dataset[int(index)]
        assert example["id"] == sequential[index]["id"]
        assert np.array_equal(example["input_ids"], sequential[index]["input_ids"])
        assert np.array_equal(example["pixel_values"], sequential[index]["pixel_values"])


def test_shard_patterns_expand():
    assert expand_shards("d/s-{00008..00011}.tar") == [f"d/s-{n:05d}.tar" for n in range(8, 12)]
    assert expand_shards(["a-{1..2}.tar", "b.tar"]) == ["a-1.tar", "a-2.tar", "b.tar"]
    assert expand_shards("{x,y}/{0..1}.tar") == ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_shards("s-{5..2}.tar")
    with pytest.raises(ValueError, match="exactly one of 'path'.*'webdataset'"):
        SourceConfig(path="x.json", webdataset="s.tar")


# -- order ---------------------------------------------------------------------------------------------
def test_shuffle_buffer_order_is_deterministic_local_and_a_permutation(processor, shards):
    dataset = dataset_of(processor, webdataset=shards, shuffle_buffer=4)
    first = dataset.epoch_indices(0, seed=7)
    assert first == dataset.epoch_indices(0, seed=7) and sorted(first) == list(range(30))
    assert first != dataset.epoch_indices(1, seed=7) and first != dataset.epoch_indices(0, seed=8)
    twice = dataset_of(processor, webdataset=shards, shuffle_buffer=4, weight=2).epoch_indices(0, seed=7)
    assert sorted(twice) == sorted(list(range(30)) * 2)
    # buffer 1: whole shards, each front to back, in a per-epoch shard order
    for epoch in range(3):
        order = dataset_of(processor, webdataset=shards, shuffle_buffer=1).epoch_indices(epoch, seed=7)
        assert all(order[k + 1] == order[k] + 1 for k in range(30) if k % 10 != 9)
    # a buffer of b emits the k-th sample from the first k + b of the stream: reads stay near-sequential
    order = stream_order([range(0, 100)], 100, 8, np.random.default_rng(0))
    assert sorted(order) == list(range(100)) and list(order) != list(range(100))
    assert all(order[k] <= k + 7 for k in range(100))


def test_shuffle_buffer_source_keeps_its_order_inside_the_mixture(processor, shards, tmp_path):
    text = tmp_path / "chat.json"
    text.write_text('[' + ','.join(f'{{"id": "t{n}", "conversations": [{{"from": "human", "value": "Hi"}}, '
                                   f'{{"from": "gpt", "value": "Yo"}}]}}' for n in range(20)) + ']')
    config = DataConfig(sources=[SourceConfig(webdataset=shards, shuffle_buffer=1), SourceConfig(path=str(text))])
    order = MixtureDataset(config, processor).epoch_indices(0, seed=1)
    streamed = [index for index in order if index < 30]
    assert sorted(streamed) == list(range(30)) and sorted(set(order) - set(streamed)) == list(range(30, 50))
    assert all(streamed[k + 1] == streamed[k] + 1 for k in range(30) if k % 10 != 9)
    assert order[:30] != streamed  # the sources are interleaved, not concatenated


# -- training ------------------------------------------------------------------------------------------
class _Kill(Exception):
    pass


def test_train_from_shards_and_resume_mid_stage(tokenizer_dir, shards, tmp_path):
    captions = tmp_path / "captions"
    write_webdataset("caption", "train", 12, str(captions), shard_size=4, progress=False)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    data = {"sources": [{"webdataset": shards, "shuffle_buffer": 6},
                        {"webdataset": str(captions / "caption-train-{00000..00002}.tar"), "weight": "sqrt"}],
            "max_length": 128}
    stage = {"name": "align", "train": {"bridge": "full"}, "lr": 1e-2, "batch_size": 4, "steps": 4, "save_every": 1,
             "precision": "fp32"}

    def run(output: str) -> RunConfig:
        return RunConfig(model=tiny_model_config(tokenizer_dir, vocab), stages=[stage], output_dir=output, data=data)

    reference = train(run(str(tmp_path / "a")), progress=False)
    losses = [record["loss"] for record in reference.history]
    assert len(losses) == 4 and all(np.isfinite(losses))

    def kill(record):
        if record["global_step"] == 2:
            raise _Kill()

    with pytest.raises(_Kill):
        train(run(str(tmp_path / "b")), progress=False, on_step=kill)
    resumed = train(run(str(tmp_path / "b")), resume=True, progress=False)
    assert [record["loss"] for record in resumed.history] == losses


# -- damage --------------------------------------------------------------------------------------------
def test_corrupt_image_member_raises_naming_shard_and_key_or_is_counted(processor, shards, tmp_path):
    path = str(tmp_path / "broken-00000.tar")
    with open(expand_shards(shards)[0], "rb") as source, open(path, "wb") as copy:
        copy.write(source.read())
    dataset = dataset_of(processor, webdataset=path)
    loader = dataset.samples[3].image_loader
    with open(path, "r+b") as handle:  # same size, garbage bytes: the tar stays valid, the JPEG does not
        handle.seek(loader.offset)
        handle.write(b"\xff\xd8" + b"\x00" * (loader.size - 2))
    with pytest.raises(ImageLoadError, match=r"broken-00000\.tar:attribute-train-000003\.jpg"):
        dataset_of(processor, webdataset=path)[3]
    skipping = dataset_of(processor, skip=True, webdataset=path)
    assert [skipping[index] is None for index in range(10)] == [index == 3 for index in range(10)]
    assert skipping.skipped == {"image_load": 1}


@pytest.mark.parametrize("cut", ["inside_member", "after_member"])
def test_truncated_shard_is_an_error_naming_it_or_keeps_what_came_before(processor, shards, tmp_path, cut):
    source = expand_shards(shards)[1]
    samples, _ = scan_shard(source)
    fourth = samples[3].image_loader
    end = fourth.offset + (fourth.size // 2 if cut == "inside_member" else -512)  # -512: before its header
    path = str(tmp_path / "cut-00001.tar")
    with open(source, "rb") as whole, open(path, "wb") as part:
        part.write(whole.read()[:end])
    with pytest.raises(ValueError, match=r"cut-00001\.tar: key 'attribute-train-0000(12|13)'.*truncated"):
        dataset_of(processor, webdataset=path)
    dataset = dataset_of(processor, skip=True, webdataset=path)
    # the key being read when the file ended may miss members: key 13 (cut in its image), or key 12 (its
    # json is the last member, and nothing says whether more of it followed)
    kept = (10, 11, 12) if cut == "inside_member" else (10, 11)
    assert [sample.id for sample in dataset.samples] == [f"attribute-train-0000{n}" for n in kept]
    assert dataset.skipped == {"corrupt_shard": 1}
    assert all(dataset[index] is not None for index in range(len(dataset)))


def test_key_without_text_or_with_bad_json(processor, tmp_path):
    path = write_tar(tmp_path / "odd-00000.tar", [("a.jpg", jpeg()), ("a.txt", b"A red square."),
                                                  ("b.jpg", jpeg("blue")), ("b.json", b'{"url": "x"}'),
                                                  ("c.jpg", jpeg()), ("c.json", b"{not json"),
                                                  ("d.json", b'{"conversations": [{"from": "human", "value": "Hi"},'
                                                             b' {"from": "gpt", "value": "Hello"}]}')])
    with pytest.raises(ValueError, match=r"odd-00000\.tar: key 'b': no text"):
        dataset_of(processor, webdataset=path)
    dataset = dataset_of(processor, skip=True, webdataset=path)
    assert [sample.id for sample in dataset.samples] == ["a", "d"]
    assert dataset.skipped == {"no_text": 1, "bad_json": 1}
    assert dataset.samples[1].images == [] and dataset[1]["pixel_values"].shape[0] == 0  # text-only json


def test_preflight_names_a_missing_shard(tmp_path, shards):
    from mmbridge.train.preflight import check_source

    check_source(SourceConfig(webdataset=shards), "data.sources.0")
    with pytest.raises(FileNotFoundError, match=r"data.sources.0: 1 of 4 webdataset shard.*-00003\.tar"):
        check_source(SourceConfig(webdataset=shards.replace("00002", "00003")), "data.sources.0")


# -- memory and processes ------------------------------------------------------------------------------
def _holds_data(value) -> bool:
    """Whether ``value`` holds bytes, an image or an open file anywhere inside it."""
    if isinstance(value, (bytes, bytearray, memoryview, Image.Image, io.IOBase)):
        return True
    if isinstance(value, dict):
        return any(_holds_data(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_holds_data(getattr(value, field.name)) for field in dataclasses.fields(value))
    return False


def test_samples_hold_no_image_bytes(processor, shards):
    dataset = dataset_of(processor, webdataset=shards)
    assert all(isinstance(sample, Sample) and isinstance(sample.image_loader, ShardImage) for sample in dataset.samples)
    assert not any(_holds_data(sample) for sample in dataset.samples)
    image_bytes = sum(sample.image_loader.size for sample in dataset.samples)
    pickled = len(pickle.dumps(dataset.samples))
    assert pickled < image_bytes / 5, (pickled, image_bytes)  # ~0.3 KB per sample against ~6 KB per JPEG
    assert pickle.loads(pickle.dumps(dataset.samples[5].image_loader)) == dataset.samples[5].image_loader


def _pixel_sum(loader: ShardImage) -> int:
    return int(np.asarray(loader()[0], dtype=np.int64).sum())


def test_forked_workers_read_through_their_own_descriptors(processor, shards):
    dataset = dataset_of(processor, webdataset=shards)
    loaders = [sample.image_loader for sample in dataset.samples[:6]]
    expected = [_pixel_sum(loader) for loader in loaders]  # the parent has opened the shard now
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_pixel_sum, loaders) == expected
    assert [_pixel_sum(loader) for loader in loaders] == expected  # the parent's descriptor still reads


def test_feature_cache_key_follows_the_shards(processor, shards, tmp_path, make_model):
    from mmbridge.train.feature_cache import cache_key

    directory = tmp_path / "copy"
    paths = write_webdataset("attribute", "train", 6, str(directory), shard_size=3, progress=False)
    source = str(directory / "attribute-train-{00000..00001}.tar")
    vision = make_model().vision
    before = cache_key(dataset_of(processor, webdataset=source), vision, "fp32")
    assert cache_key(dataset_of(processor, webdataset=source), vision, "fp32") == before
    os.utime(paths[1], ns=(1, 1))  # a shard rewritten in place: same names, another mtime
    assert cache_key(dataset_of(processor, webdataset=source), vision, "fp32") != before
