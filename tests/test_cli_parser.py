"""The ``mmbridge`` parser: every sub-command answers ``--help`` with its own usage and options."""

from __future__ import annotations

import pytest

from mmbridge.cli import build_parser

# each sub-command (path) with options its help must list
COMMANDS = {
    ("train",): ["recipe", "overrides", "--resume", "--output-dir", "--no-progress"],
    ("pretrain-qformer",): ["recipe", "overrides", "--resume", "--output-dir", "--no-progress"],
    ("generate",): ["--model", "--image", "--prompt", "--max-new-tokens", "--do-sample", "--temperature", "--top-p",
                    "--seed", "--stream"],
    ("info",): ["--model", "--image-size"],
    ("export",): ["--model", "--format", "--out", "--force"],
    ("data",): ["miniworld", "stats", "select"],
    ("data", "miniworld"): ["--task", "--split", "--n", "--out", "--seed", "--image-format", "--no-progress",
                            "--box-format", "--format", "--shard-size"],
    ("data", "stats"): ["recipe", "overrides"],
    ("data", "select"): ["IN", "--method", "--keep", "--out", "--seed", "--concepts", "--balance-yes-no",
                         "--min-count", "--max-fraction"],
    ("eval",): ["--model", "--suite", "--tasks", "--n", "--seed", "--batch-size", "--shots", "--out", "--box-format",
                "--blind", "--with-blind", "--compare", "--no-progress"],
    ("serve",): ["--model", "--host", "--port", "--served-model-name", "--device", "--allow-remote-images",
                 "--image-root", "--max-image-steps", "--max-image-size"],
}


def _help(capsys: pytest.CaptureFixture, path: tuple[str, ...]) -> str:
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args([*path, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_sub_command(capsys):
    printed = _help(capsys, ())
    assert printed.startswith("usage: mmbridge")
    assert all(command in printed for command in {path[0] for path in COMMANDS})


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_sub_command_help(capsys, path):
    printed = _help(capsys, path)
    assert printed.startswith(f"usage: mmbridge {' '.join(path)}")
    missing = [option for option in COMMANDS[path] if option not in printed]
    assert not missing, missing


def test_sub_commands_parse_to_their_handlers():
    parser = build_parser()
    assert parser.parse_args(["train", "r.yaml", "stages.0.lr=1"]).run.__name__ == "_train"
    assert parser.parse_args(["data", "stats", "r.yaml"]).run.__name__ == "_data_stats"
    assert parser.parse_args(["eval", "--compare", "a.json"]).run.__name__ == "_eval"
    assert parser.parse_args(["serve", "--model", "m"]).run.__name__ == "_serve"
