"""The OpenAI server (serving/): the official openai client against uvicorn on the loopback address, one tiny
elastic model serving every budget; the engine's batching; mem:/tps: budgets."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx2 as httpx  # the openai client's own HTTP library
import openai
import pytest
import torch
import uvicorn
from conftest import tiny_llama
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from modeling_llamaflex import LlamaFlexForCausalLM
from serving.api import Server, create_app
from serving.device_budget import memory_bytes, ranked_architectures, resolve_device_budget
from serving.engine import Engine, Finished, Job, Token
from serving.latency import LatencyTable
from serving.sampling import SamplingParams

NAME = "tiny"
PROMPTS = ["To be", "or not to be, that is", "Hi"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, <s> first, and a chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def flex(tokenizer):
    return LlamaFlexForCausalLM.from_llama(tiny_llama(vocab_size=len(tokenizer))).eval()


@pytest.fixture(scope="module")
def server(flex, tokenizer, tmp_path_factory):
    latency = LatencyTable(flex, path=str(tmp_path_factory.mktemp("latency") / "machine.json"), steps=2)
    engine = Engine(flex, tokenizer.pad_token_id, max_batch_size=4, queue_timeout=30, request_timeout=60)
    state = Server(flex, tokenizer, NAME, engine, default_max_tokens=16, latency=latency)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(state), log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.02)
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield state
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def complete(client, budget, prompt, max_tokens=8, **extra):
    out = client.completions.create(model=f"{NAME}@{budget}", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"return_token_ids": True, **extra})
    return out.choices[0].token_ids


def offline(flex, tokenizer, budget, prompt, max_tokens=8):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = flex.generate(ids, budget=budget, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_models_lists_trained_budgets_and_the_full_model(client, flex):
    ids = [m.id for m in client.models.list().data]
    assert ids == [f"{NAME}@{b:g}" for b in flex.config.budgets] + [f"{NAME}@1"]


@pytest.mark.parametrize("budget", [0.5, 0.75, 1])
def test_greedy_completion_equals_offline_generation(client, flex, tokenizer, budget):
    for prompt in PROMPTS[:2]:
        assert complete(client, budget, prompt) == offline(flex, tokenizer, budget, prompt)


def test_completion_reports_its_architecture_usage_and_text(client, flex, tokenizer):
    out = client.completions.create(model=NAME, prompt="To be", max_tokens=5, temperature=0,
                                    extra_body={"budget": "0.5", "ignore_eos": True})
    arch = flex.architecture(0.5)
    assert out.model == f"{NAME}@0.5" and out.llamaflex["architecture"]["hidden"] == arch.hidden
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 5 and out.usage.total_tokens == 11
    assert out.choices[0].finish_reason == "length"
    ids = offline(flex, tokenizer, 0.5, "To be", 5)
    assert out.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_streaming_and_stop(client):
    messages = [{"role": "user", "content": "Say something"}]
    kwargs = dict(model=f"{NAME}@0.75", messages=messages, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    stream = client.completions.create(model=f"{NAME}@1", prompt="To be", max_tokens=6, temperature=0, stream=True)
    assert len([c for c in stream]) >= 2
    if len(text) > 4:  # a stop string cuts the text before it, and the request ends with "stop"
        stopped = client.chat.completions.create(stop=[text[3:5]], **kwargs)
        assert stopped.choices[0].message.content == text[: text.index(text[3:5])]
        assert stopped.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_repeats(client):
    def sample():
        return client.completions.create(model=f"{NAME}@0.5", prompt="To be", max_tokens=8, temperature=1.0,
                                         top_p=0.9, seed=7, extra_body={"return_token_ids": True}).choices[0].token_ids

    assert sample() == sample()


def test_concurrent_mixed_budgets_equal_sequential(client):
    jobs = [(b, p) for b in (0.5, 0.75, 1) for p in PROMPTS]
    sequential = [complete(client, b, p, 10, ignore_eos=True) for b, p in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        concurrent_ = list(pool.map(lambda job: complete(client, *job, 10, ignore_eos=True), jobs))
    assert concurrent_ == sequential


def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, server):
    def error(exc_type, **kwargs):
        with pytest.raises(exc_type) as info:
            client.completions.create(**{"model": f"{NAME}@0.5", "prompt": "To be", **kwargs})
        return info.value.response.json()["error"]

    err = error(openai.NotFoundError, model="gpt-4")
    assert err["code"] == "model_not_found" and f"'{NAME}@0.5'" in err["message"] and err["param"] == "model"
    err = error(openai.BadRequestError, model=f"{NAME}@0.01")
    assert "smallest" in err["message"] and "allowed budgets are" in err["message"]
    err = error(openai.BadRequestError, model=f"{NAME}@half")
    assert "not a number" in err["message"] and "mem:" in err["message"]
    err = error(openai.BadRequestError, prompt="x" * 200)
    assert err["code"] == "context_length_exceeded" and "128" in err["message"]
    err = error(openai.BadRequestError, prompt="To be", max_tokens=125)
    assert err["code"] == "context_length_exceeded" and "max_tokens 125" in err["message"]
    err = error(openai.BadRequestError, max_tokens=-3)
    assert err["param"] == "max_tokens" and "greater than or equal to 1" in err["message"] and "-3" in err["message"]
    err = error(openai.BadRequestError, n=2)
    assert "only n=1" in err["message"]
    bad = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"].startswith("GET /v1/nothing")
    engine = server.engine
    engine.max_queue, engine.queue_timeout = 0, 30
    err = error(openai.RateLimitError)
    assert err["code"] == "queue_full" and "--max_queue" in err["message"]
    engine.max_queue, engine.queue_timeout = 64, 0.0
    err = error(openai.InternalServerError)
    assert err["code"] == "queue_timeout"
    engine.queue_timeout = 30
    assert complete(client, 0.5, "To be")  # still answering


def test_engine_batches_one_architecture_and_interleaves_others(flex, tokenizer):
    engine = Engine(flex, 0, max_batch_size=8)
    events, lock = [], threading.Lock()

    def sink(tag):
        def put(event):
            with lock:
                events.append((tag, event))
        return put

    archs = {b: flex.architecture(b) for b in (0.5, 1.0)}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for b, arch in archs.items():
        for i, prompt in enumerate(PROMPTS):
            engine.submit(Job(tokenizer(prompt)["input_ids"], arch, params, sink((b, i)), tokenizer))
    engine.start()  # everything is waiting already: one batch per architecture, decoded in turns
    for _ in range(500):
        if sum(isinstance(e, Finished) for _, e in events) == 6:
            break
        time.sleep(0.01)
    engine.close()
    assert engine.steps == 2 * 5  # 5 decoding steps per batch after the prefill, never one row at a time
    order = [tag[0] for tag, e in events if isinstance(e, Token) and tag[1] == 0]
    assert order[:4] == [0.5, 1.0, 0.5, 1.0]  # step by step, not one whole generation after the other
    for (b, i), _ in events:
        got = [e.token_id for tag, e in events if tag == (b, i) and isinstance(e, Token) and e.token_id >= 0]
        ids = torch.tensor([tokenizer(PROMPTS[i])["input_ids"]])
        ref = flex.generate(ids, budget=b, do_sample=False, max_new_tokens=6, min_new_tokens=6)[0, ids.shape[1]:]
        assert got == ref.tolist()


def test_elastic_forward_is_safe_in_threads(flex):
    torch.manual_seed(0)
    ids = torch.randint(4, 99, (2, 16))
    archs = [flex.architecture(b) for b in (0.5, 0.75, 1.0)]
    with torch.no_grad():
        ref = [flex(ids, architecture=a).logits for a in archs]

        def run(i):
            return [flex(ids, architecture=archs[i % 3]).logits for _ in range(5)]

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(run, range(6)))
    for i, outs in enumerate(results):
        for out in outs:
            torch.testing.assert_close(out, ref[i % 3], atol=0, rtol=0)


def test_memory_budget_picks_the_best_architecture_that_fits(flex, client):
    full = memory_bytes(flex.config, ranked_architectures(flex.config)[0][0], context=128)
    limit = int(full["total"] * 0.6)
    arch = resolve_device_budget(flex, f"mem:{limit}B", context=128)
    need = memory_bytes(flex.config, arch, context=128)["total"]
    assert need <= limit and "fit" in arch.note
    fitting = [a for a, _, _ in ranked_architectures(flex.config) if memory_bytes(flex.config, a, 128)["total"] <= limit]
    assert arch.num_parameters == max(a.num_parameters for a in fitting)  # no scores: the largest that fits
    out = client.completions.create(model=f"{NAME}@mem:{limit}B", prompt="To be", max_tokens=2)
    assert out.llamaflex["architecture"]["num_parameters"] == arch.num_parameters
    with pytest.raises(ValueError, match="the smallest needs"):
        resolve_device_budget(flex, "mem:1KB")
    batch = resolve_device_budget(flex, f"mem:{limit}B,context=128,batch=4")
    assert memory_bytes(flex.config, batch, 128, 4)["total"] <= limit and batch.num_parameters <= arch.num_parameters


def test_speed_budget_is_measured_once_and_met(flex, server, tmp_path):
    table = LatencyTable(flex, path=str(tmp_path / "m.json"), steps=2)
    full = table.tokens_per_second(ranked_architectures(flex.config)[0][0])
    arch = resolve_device_budget(flex, f"tps:{full / 3:.1f}", latency=table)
    assert table.tokens_per_second(arch) >= full / 3 and "tokens/s" in arch.note
    again = LatencyTable(flex, path=str(tmp_path / "m.json"), steps=2)
    assert again.measured(arch)  # cached on disk for this machine
    with pytest.raises(ValueError, match="the fastest decodes"):
        resolve_device_budget(flex, "tps:1000000000", latency=table)
    with pytest.raises(ValueError, match="not a device budget"):
        resolve_device_budget(flex, "mem:lots")


def test_llamaflex_serve_is_a_command(capsys):
    import llamaflex_cli

    with pytest.raises(SystemExit) as info:
        llamaflex_cli.main(["serve", "--help"])
    assert info.value.code == 0 and "llamaflex serve" in capsys.readouterr().out
