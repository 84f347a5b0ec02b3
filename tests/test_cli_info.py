"""``mmbridge info``: what it prints about a saved model must be what the model does, one setting per line."""

from __future__ import annotations

import pytest

from mmbridge.cli import main
from mmbridge.model.multimodal import MultimodalModel

PERCEIVER = {"type": "perceiver", "num_latents": 16, "depth": 1, "heads": 4}
NATIVE_PATCH = {"type": "patch", "patch_size": 4, "image_size": 16}
# what each line of `mmbridge info` starts with (the table's rows start with the module keys)
LINE_STARTS = ("vision", "bridge", "llm", "high resolution:", "visual tokens", "adapters:", "parameters,", "key",
               "total")


def _info(model: MultimodalModel, directory: str, capsys: pytest.CaptureFixture) -> str:
    model.save_pretrained(directory)
    assert main(["info", "--model", directory]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("pad", [True, False])
def test_info_reports_pad_to_square_as_the_model_pads(make_model, tmp_path, capsys, pad):
    model = make_model(vision={"pad_to_square": pad})
    assert model.vision.transform.pad_to_square is pad
    printed = _info(model, str(tmp_path / "model"), capsys)
    vision_line = next(line for line in printed.splitlines() if line.startswith("vision"))
    assert f"pad_to_square={pad}" in vision_line and f"pad_to_square={not pad}" not in printed
    reloaded = MultimodalModel.from_pretrained(str(tmp_path / "model"))
    assert reloaded.vision.transform.pad_to_square is pad and reloaded.export_config().vision.pad_to_square is pad


@pytest.mark.parametrize("vision,highres,bridge,escaped", [
    (None, {"type": "uhd", "max_slices": 6}, PERCEIVER, ["column_separator=','", "row_separator='\\n'"]),
    (NATIVE_PATCH, {"type": "native", "max_size": [40, 56]}, {"type": "mlp", "depth": 1}, ["row_end='\\n'"])])
def test_info_prints_separators_escaped_one_setting_per_line(make_model, tmp_path, capsys, vision, highres, bridge,
                                                           escaped):
    printed = _info(make_model(vision=vision, highres=highres, bridge=bridge), str(tmp_path / "model"), capsys)
    lines = printed.splitlines()
    highres_line = next(line for line in lines if line.startswith("high resolution:"))
    assert all(text in highres_line for text in escaped), highres_line
    assert highres_line.endswith(f"= id {make_model().image_token_id}")  # the rest of the setting's line
    assert f"type={highres['type']}" in highres_line  # plain words stay unquoted
    assert all(line.startswith(LINE_STARTS) for line in lines), lines  # no setting spilled onto a line of its own
