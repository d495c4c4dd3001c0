"""The tiny-model builder: what it saves reloads offline, by path, like a user's model."""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_selfplay.testing import make_tiny_causal_lm


def test_tiny_model_reloads_offline_in_a_fresh_process_and_generates(tiny_model_path):
    # A fresh interpreter with the Hub disabled: only the files on disk can satisfy the load.
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({tiny_model_path!r})
model = AutoModelForCausalLM.from_pretrained({tiny_model_path!r})
prompt = tok.apply_chat_template([{{"role": "user", "content": "hello"}}], add_generation_prompt=True, tokenize=False)
inputs = tok(prompt, return_tensors="pt")
torch.manual_seed(0)
out = model.generate(**inputs, max_new_tokens=12, do_sample=True, min_new_tokens=12)
print(out.shape[1] - inputs["input_ids"].shape[1], repr(tok.decode(out[0, inputs["input_ids"].shape[1]:])))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    new_tokens, text = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(new_tokens) == 12
    assert len(eval(text)) > 0


def test_tokenizer_special_tokens_and_chat_template_prefix(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    rendered_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}], tokenize=False)
    assert full.startswith(rendered_prompt)
    # TRL finds the completion where the tokenised prompt stops being a prefix: it must be a token prefix too
    prompt_ids = tok(rendered_prompt)["input_ids"]
    assert tok(full)["input_ids"][: len(prompt_ids)] == prompt_ids
    # Round trip of ordinary text
    text = "The capital of France is Paris."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_builder_is_deterministic_and_shapes_follow_arguments(tmp_path, tiny_model_path):
    a = make_tiny_causal_lm(tmp_path / "a", architecture="llama", hidden_size=64, num_hidden_layers=1, seed=3)
    b = make_tiny_causal_lm(tmp_path / "b", architecture="llama", hidden_size=64, num_hidden_layers=1, seed=3)
    c = make_tiny_causal_lm(tmp_path / "c", architecture="llama", hidden_size=64, num_hidden_layers=1, seed=4)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    assert ma.config.model_type == "llama" and ma.config.num_hidden_layers == 1
    assert ma.config.hidden_size // ma.config.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(ma.lm_head.weight, mc.lm_head.weight)
    qwen = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert qwen.config.model_type == "qwen2"
    assert qwen.config.vocab_size == len(AutoTokenizer.from_pretrained(tiny_model_path))


def test_custom_corpus_shapes_the_vocabulary(tmp_path):
    path = make_tiny_causal_lm(tmp_path / "digits", vocab_corpus=["12 + 34 = 46", "7 + 8 = 15"] * 50, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("12 + 34 = 46")["input_ids"]
    assert tok.decode(ids) == "12 + 34 = 46"
    assert len(ids) < len(b"12 + 34 = 46")  # merges learned from the corpus
