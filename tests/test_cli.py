"""The command line: convert, architecture, extract; errors exit with code 2 and a message."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ATOL, tiny_llama
from transformers import AutoModelForCausalLM

from modeling_llamaflex import LlamaFlexForCausalLM
from modeling_llamaflex.__main__ import main


def test_convert_architecture_extract(tmp_path, input_ids, capsys):
    parent = tiny_llama()
    parent.save_pretrained(tmp_path / "parent")
    main(["convert", "--parent", str(tmp_path / "parent"), "--out", str(tmp_path / "flex"),
          "--elastic", '{"budgets": [0.5, 0.8]}'])
    flex = LlamaFlexForCausalLM.from_pretrained(tmp_path / "flex")
    assert flex.config.budgets == [0.5, 0.8]
    torch.testing.assert_close(flex(input_ids).logits, parent(input_ids).logits, atol=ATOL, rtol=0)

    main(["architecture", "--model", str(tmp_path / "flex"), "--budget", "0.5", "90K"])
    printed = capsys.readouterr().out
    assert "budget 0.5:" in printed and f"params={flex.architecture(0.5).num_parameters:,}" in printed

    main(["extract", "--model", str(tmp_path / "flex"), "--budget", "0.5", "0.8", "--out", str(tmp_path / "subs")])
    for budget in (0.5, 0.8):
        sub = AutoModelForCausalLM.from_pretrained(tmp_path / "subs" / f"budget-{budget}")
        torch.testing.assert_close(sub(input_ids).logits, flex(input_ids, budget=budget).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "--budget", "0.01"], "cannot be reached"),
        (["extract", "--budget", "half"], "is not a number"),
        (["architecture", "--budget", "1.5"], r"outside \(0, 1\]"),
    ],
)
def test_cli_errors(tmp_path, capsys, args, message):
    flex = LlamaFlexForCausalLM.from_llama(tiny_llama())
    flex.save_pretrained(tmp_path / "flex")
    args = args[:1] + ["--model", str(tmp_path / "flex")] + args[1:]
    if args[0] == "extract":
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_refuses_a_plain_llama_and_an_existing_output(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "parent")
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(tmp_path / "parent"), "--budget", "0.5", "--out", str(tmp_path / "x")])
    assert "not a LlamaFlex one" in capsys.readouterr().err
    LlamaFlexForCausalLM.from_llama(tiny_llama()).save_pretrained(tmp_path / "flex")
    main(["extract", "--model", str(tmp_path / "flex"), "--budget", "0.5", "--out", str(tmp_path / "sub")])
    before = (tmp_path / "sub" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(tmp_path / "flex"), "--budget", "0.8", "--out", str(tmp_path / "sub")])
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "sub" / "model.safetensors").read_bytes() == before


def test_extract_with_compensation(tmp_path, capsys):
    """`extract --compensate_on TEXT` saves the sub-model that `flex.extract(b, compensation=...)` gives on the
    same blocks of that text, which differs from the plain slice; without a tokenizer it says what is missing."""
    from conftest import make_checkpoint

    from modeling_llamaflex import Compensation
    from modeling_llamaflex.__main__ import calibration_blocks
    from transformers import AutoTokenizer

    model_dir, _, text = make_checkpoint(tmp_path)
    main(["extract", "--model", str(model_dir), "--budget", "0.5", "--out", str(tmp_path / "sub"),
          "--compensate_on", str(text), "--num_samples", "8", "--seq_len", "32"])
    assert "compensation: least-squares refit" in capsys.readouterr().out
    flex = LlamaFlexForCausalLM.from_pretrained(model_dir)
    blocks = calibration_blocks(AutoTokenizer.from_pretrained(model_dir), [str(text)], 8, 32)
    expected = flex.extract(0.5, compensation=Compensation.from_data(flex, blocks, progress=False))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    ids = blocks[:2]
    torch.testing.assert_close(saved(ids).logits, expected(ids).logits, atol=ATOL, rtol=0)
    assert not torch.allclose(saved(ids).logits, flex(ids, budget=0.5).logits, atol=1e-3)

    flex.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(SystemExit):
        main(["extract", "--model", str(tmp_path / "no-tokenizer"), "--budget", "0.5", "--out", str(tmp_path / "x"),
              "--compensate_on", str(text)])
    assert "needs the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()
