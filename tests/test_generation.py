"""Generation: transformers backend (K samples, order, seeds, two processes), prompt formatting, argument errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_selfplay.generation import encode_prompt, format_prompt, generate_completions
from trl_selfplay.generation.hf import SeededSampler
from trl_selfplay.generation.vllm import is_vllm_available

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "hello",
    [{"role": "user", "content": "Write a short poem about the sea."}],
    "one two three four five six seven",
]
SPIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path)


def test_k_samples_in_prompt_order_and_seeded(model, tokenizer):
    kwargs = dict(tokenizer=tokenizer, num_samples=3, max_new_tokens=8)
    out = generate_completions(model, PROMPTS, seed=0, batch_size=4, **kwargs)
    assert [len(c) for c in out.completions] == [3] * len(PROMPTS)
    assert [len(c) for c in out.num_tokens] == [3] * len(PROMPTS)
    assert all(1 <= n <= 8 for row in out.num_tokens for n in row)
    assert len({c for row in out.completions for c in row}) > len(PROMPTS)  # K different samples, not K copies

    # Same seed -> same text, whatever the batch size (each (prompt, sample) has its own noise stream).
    again = generate_completions(model, PROMPTS, seed=0, batch_size=1, **kwargs)
    assert again.completions == out.completions and again.num_tokens == out.num_tokens
    assert generate_completions(model, PROMPTS, seed=1, batch_size=4, **kwargs).completions != out.completions

    # Order: greedy completions follow their prompts when the list is reversed (and batches regroup).
    greedy = generate_completions(model, PROMPTS, temperature=0.0, batch_size=3, **kwargs)
    backwards = generate_completions(model, PROMPTS[::-1], temperature=0.0, batch_size=2, **kwargs)
    assert backwards.completions[::-1] == greedy.completions
    assert all(len(set(row)) == 1 for row in greedy.completions)  # greedy: K identical samples
    assert len({row[0] for row in greedy.completions}) == len(PROMPTS)


def test_greedy_matches_plain_generate_on_the_formatted_prompt(model, tokenizer):
    """Generation conditions on exactly `format_prompt(...)` tokenised like TRL does, and decodes like `generate`."""
    for prompt, template in [(PROMPTS[0], None), (PROMPTS[0], SPIN_TEMPLATE), (PROMPTS[2], None)]:
        out = generate_completions(
            model, [prompt], tokenizer=tokenizer, temperature=0.0, max_new_tokens=6, prompt_template=template
        )
        text = format_prompt(tokenizer, prompt, template)
        assert out.prompts == [text]
        ids = torch.tensor([encode_prompt(tokenizer, prompt, template)])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        new = ref[0, ids.shape[1] :].tolist()
        end = new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else len(new)
        assert out.num_tokens == [[end]]
        assert out.completions == [[tokenizer.decode(new[:end], skip_special_tokens=True)]]


def test_model_sampling_defaults_do_not_leak_in(tiny_model_path, tokenizer):
    """A model whose generation_config samples (as many chat models ship) still gives seeded, reproducible text."""
    from transformers import AutoModelForCausalLM

    sampling_model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sampling_model.generation_config.update(do_sample=True, temperature=0.3, top_k=3)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=6, num_samples=2)
    for temperature in (0.0, 1.0):
        first = generate_completions(sampling_model, PROMPTS[:2], temperature=temperature, **kwargs)
        assert generate_completions(sampling_model, PROMPTS[:2], temperature=temperature, **kwargs) == first


def test_token_counts_include_eos(model, tokenizer):
    eos = tokenizer.eos_token_id
    calls = {"n": 0}

    def force_eos_at_third_step(module, args, output):
        calls["n"] += 1
        output[..., eos] = 100.0 if calls["n"] == 3 else -100.0
        return output

    handle = model.lm_head.register_forward_hook(force_eos_at_third_step)
    try:
        out = generate_completions(model, ["hello"], tokenizer=tokenizer, max_new_tokens=10, seed=0)
    finally:
        handle.remove()
    assert out.num_tokens == [[3]]  # two tokens, then EOS, counted
    assert "<|im_end|>" not in out.completions[0][0]

    def never_eos(module, args, output):
        output[..., eos] = -100.0
        return output

    handle = model.lm_head.register_forward_hook(never_eos)
    try:
        out = generate_completions(model, ["hello"], tokenizer=tokenizer, max_new_tokens=7, seed=0)
    finally:
        handle.remove()
    assert out.num_tokens == [[7]]  # cut at the budget


def test_seeded_sampler_samples_softmax_and_respects_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    input_ids = torch.zeros(1, 5, dtype=torch.long)
    draws = 4000
    counts = torch.zeros(4)
    for row_seed in range(draws):
        scores = SeededSampler([row_seed], prompt_width=5, temperature=1.0, top_p=1.0)(input_ids, logits.clone())
        counts[scores.argmax()] += 1
    expected = logits.softmax(-1)[0]
    assert torch.allclose(counts / draws, expected, atol=0.03), (counts / draws, expected)

    # top_p = 0.8: the nucleus is {0, 1} (0.64 + 0.24 >= 0.8); tokens 2 and 3 are never drawn.
    nucleus = torch.zeros(4)
    for row_seed in range(1000):
        scores = SeededSampler([row_seed], prompt_width=5, temperature=1.0, top_p=0.8)(input_ids, logits.clone())
        nucleus[scores.argmax()] += 1
    assert nucleus[2] == 0 and nucleus[3] == 0 and nucleus[1] > 0
    # Temperature 0 leaves the logits untouched (greedy).
    assert torch.equal(SeededSampler([0], 5, 0.0, 1.0)(input_ids, logits.clone()), logits)


def test_prompt_formatting(tokenizer):
    chat = format_prompt(tokenizer, "Hi there", None)
    assert chat == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, [{"role": "user", "content": "Hi there"}]) == chat
    assert format_prompt(tokenizer, "Hi {x}", SPIN_TEMPLATE) == "### Instruction: Hi {x}\n\n### Response: "
    with pytest.raises(ValueError, match="prompt_template"):
        format_prompt(tokenizer, "Hi", "no placeholder")
    with pytest.raises(ValueError, match="conversation"):
        format_prompt(tokenizer, [{"role": "user", "content": "Hi"}], SPIN_TEMPLATE)


def test_prompt_formatting_without_chat_template(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(tok, "Hi")
    assert format_prompt(tok, "Hi", SPIN_TEMPLATE).startswith("### Instruction: Hi")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "tgi"}, "backend"),
        ({"num_samples": 0}, "num_samples"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"prompt_template": "missing placeholder"}, "prompt_template"),
    ],
)
def test_bad_arguments_fail_before_loading(kwargs, match):
    # The model path does not exist: the error must come from argument checking, before any loading.
    with pytest.raises(ValueError, match=match):
        generate_completions("/nonexistent/model", ["hi"], **kwargs)


def test_loaded_model_needs_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        generate_completions(model, ["hi"])


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed here")
def test_vllm_backend_missing_gives_install_hint(tiny_model_path):
    with pytest.raises(ImportError, match=r"trl_selfplay\[vllm\]"):
        generate_completions(tiny_model_path, ["hi"], backend="vllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_return_what_one_returns(tiny_model_path, tmp_path):
    script = REPO / "tests" / "scripts" / "generation_multiprocess.py"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), str(script), tiny_model_path, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0] == ranks[1]  # every process gets every prompt back, in order

    sys.path.insert(0, str(script.parent))
    try:
        from generation_multiprocess import PROMPTS as SCRIPT_PROMPTS
    finally:
        sys.path.remove(str(script.parent))
    single = generate_completions(tiny_model_path, SCRIPT_PROMPTS, num_samples=2, max_new_tokens=12, seed=3)
    assert ranks[0]["completions"] == single.completions
    assert ranks[0]["num_tokens"] == single.num_tokens
