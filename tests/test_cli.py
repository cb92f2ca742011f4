"""The command line explains itself and turns bad input into one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl

from lmdistill.cli import build_parser, main

COMMANDS = ["demo", "run", "generate", "cache", "eval"]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "Distil a large causal language model" in text
    for command in COMMANDS:
        assert command in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser = build_parser()
    assert f"usage: lmdistill {command}" in text and "key.path=value" in text
    assert len(text) > 300, parser.format_help()


def test_bad_config_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(ROOT / "configs" / "tiny.yaml"), "loss.divergance=reverse_kl"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lmdistill run: error: unknown key(s) loss.divergance" in err
    assert "Traceback" not in err


def test_malformed_data_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}])
    with data.open("a") as handle:
        handle.write('{"prompt": "c", "response": }\n')
    code = main(
        [
            "run",
            str(ROOT / "configs" / "tiny.yaml"),
            f"data.train={data}",
            f"output_dir={tmp_path / 'o'}",
        ]
    )
    assert code == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
