"""`python -m engine` as a user runs it: every problem with a model file ends in one `error:` line on stderr
and exit status 2, and generate, ppl and bench work on the default model."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import save_file

from engine.generator import Generator
from engine.sampling import SamplingSettings
from references import our_model
from test_gguf import FFN, HIDDEN, random_tensor_bytes, write_llama_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
}


# Several commands run at once below; one thread each keeps them from fighting over a small machine's
# cores (on two busy cores, torch's spinning worker threads made them four times slower).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=ONE_THREAD, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def model_folder(folder, config=LLAMA_CONFIG, files=None):
    """A model folder with this config.json, one small safetensors file and any `files` {name: object}."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 64)}, str(folder / "model.safetensors"))
    for name, content in (files or {}).items():
        (folder / name).write_text(json.dumps(content))
    return folder


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def spoil_header(path):
    data = bytearray(path.read_bytes())
    data[8] = ord("X")  # the header JSON's opening brace
    path.write_bytes(bytes(data))
    return path


def unsupported_gguf(path):
    q2_k = GGMLQuantizationType.Q2_K
    write_llama_gguf(path, replace={"blk.0.ffn_down.weight": (random_tensor_bytes(q2_k, HIDDEN, FFN), q2_k)})
    return path


def truncated_gguf(path):
    write_llama_gguf(path)
    return cut_in_half(path)


# Each case builds a broken model under tmp_path and returns (what -d gets, the file the message must
# name, words that say what is wrong).
ERROR_CASES = {
    "missing path": lambda tmp: (tmp / "nowhere", tmp / "nowhere", "no such file"),
    "folder without config.json": lambda tmp: (tmp, tmp, "config.json is missing"),
    "unsupported architecture": lambda tmp: (
        model_folder(tmp / "gpt2", {**LLAMA_CONFIG, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
        tmp / "gpt2" / "config.json", "'GPT2LMHeadModel' is not supported"),
    "unsupported GGUF tensor type": lambda tmp: (
        unsupported_gguf(tmp / "q2k.gguf"), tmp / "q2k.gguf", "blk.0.ffn_down.weight has type Q2_K"),
    "3-bit GPTQ": lambda tmp: (
        model_folder(tmp / "gptq", files={"quantize_config.json": {"bits": 3, "group_size": 128}}),
        tmp / "gptq" / "quantize_config.json", "3-bit GPTQ is not supported"),
    "truncated safetensors": lambda tmp: (
        cut_in_half(model_folder(tmp / "cut") / "model.safetensors").parent,
        tmp / "cut" / "model.safetensors", "truncated"),
    "corrupt safetensors header": lambda tmp: (
        spoil_header(model_folder(tmp / "bad") / "model.safetensors").parent,
        tmp / "bad" / "model.safetensors", "header is not valid JSON"),
    "truncated GGUF": lambda tmp: (truncated_gguf(tmp / "cut.gguf"), tmp / "cut.gguf", "not a readable GGUF file"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_model_problem_is_one_error_line_and_status_2(tmp_path, case):
    model, named, problem = ERROR_CASES[case](tmp_path)
    status, stdout, stderr = finish(start("generate", "-d", str(model), "--prompt", "Hi"))
    assert (status, stdout) == (2, ""), stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert str(named) in stderr and problem in stderr, stderr


# The commands that load the default model, run side by side: each spends most of its time loading. On
# the CPU, so that the in-process float32 model is their reference whatever the machine has.
DEFAULT = ["-d", "default", "--device", "cpu"]
GENERATE = ["generate", *DEFAULT, "--max-new-tokens", "5", "--temperature", "0"]
CHAT_PROMPT, RAW_PROMPT = "Hi", "The capital of France is"
SUCCESS_COMMANDS = {
    "chat": [*GENERATE, "--prompt", CHAT_PROMPT],
    "raw": [*GENERATE, "--prompt", RAW_PROMPT, "--raw"],
    "ppl": ["ppl", *DEFAULT, "--text-file", "tests/data/ppl_text.txt", "--ctx", "256"],
    "bench": ["bench", *DEFAULT, "--new-tokens", "8", "--prompt-len", "16", "--runs", "2", "--json"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    started = {name: start(*args) for name, args in SUCCESS_COMMANDS.items()}
    return {name: finish(process) for name, process in started.items()}


def greedy_text(prompt_ids) -> str:
    stream = Generator(our_model()).generate(prompt_ids, SamplingSettings(temperature=0), max_new_tokens=5)
    return "".join(stream)


@pytest.mark.parametrize("name", ["chat", "raw"])
def test_generate_prints_the_greedy_reply(runs, name):
    status, stdout, stderr = runs[name]
    assert status == 0, stderr
    tokenizer = our_model().tokenizer
    if name == "raw":
        prompt_ids = tokenizer.encode(RAW_PROMPT, add_bos=tokenizer.add_bos)
    else:
        prompt_ids = tokenizer.encode_chat(tokenizer.render_chat([{"role": "user", "content": CHAT_PROMPT}]))
    assert stdout.strip() and stdout == greedy_text(prompt_ids) + "\n"


def test_ppl_ends_with_the_perplexity(runs):
    status, stdout, stderr = runs["ppl"]
    assert status == 0, stderr
    match = re.fullmatch(r"perplexity: (\d+\.\d+)", stdout.splitlines()[-1])
    assert match and 1.0 < float(match.group(1)) < 100.0, stdout


def test_bench_json_is_the_last_line(runs):
    status, stdout, stderr = runs["bench"]
    assert status == 0, stderr
    result = json.loads(stdout.splitlines()[-1])
    assert result["model"] == os.path.basename(our_model().path) and result["device"] == "cpu"
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in ("prompt_tok_s", "decode_tok_s"))
