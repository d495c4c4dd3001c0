"""Generation: transformers backend (K samples, order, seeds, greedy, special tokens, two processes), prompt
formatting, the judge's source text, argument errors, and an import graph without circles."""

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trl_selfplay.generation import (
    encode_prompt,
    format_prompt,
    generate_completions,
    is_vllm_available,
    judge_source_text,
)
from trl_selfplay.generation.seeding import SeededSampler

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
    # temperature 0 is greedy decoding even though the model's own generation config samples: the argmax path.
    greedy = generate_completions(sampling_model, PROMPTS[:2], temperature=0.0, **kwargs)
    for prompt, row in zip(PROMPTS[:2], greedy.completions):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        with torch.no_grad():
            ref = sampling_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, top_k=None
            )
        assert row == [tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)] * 2


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


def _bos_tokenizer(path):
    """The tiny tokenizer with a BOS token that `tokenizer(text)` prepends, like Llama's / Mistral's `<s>`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, bos_token="<|endoftext|>", add_bos_token=True)
    assert tok("hi")["input_ids"][0] == tok.bos_token_id != tok("hi", add_special_tokens=False)["input_ids"][0]
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model_path):
    return _bos_tokenizer(tiny_model_path)


def _prompt_ids_seen_by_the_model(model, tokenizer, prompt, **kwargs) -> list[int]:
    """Generate greedily for one prompt and return the input ids of the model's first forward pass (the prompt)."""
    seen = []

    def record(module, args, kwargs_):
        seen.append(kwargs_["input_ids"][0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_completions(model, [prompt], tokenizer=tokenizer, temperature=0.0, max_new_tokens=2, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_add_special_tokens_decides_the_bos_the_model_sees(model, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    prompt = "What is the capital of France?"
    text = format_prompt(bos_tokenizer, prompt, SPIN_TEMPLATE)
    plain_ids = bos_tokenizer(text, add_special_tokens=False)["input_ids"]
    # uclaml/SPIN's spin/generate.py: the fixed template tokenised with add_special_tokens=False, no BOS.
    seen = _prompt_ids_seen_by_the_model(
        model, bos_tokenizer, prompt, prompt_template=SPIN_TEMPLATE, add_special_tokens=False
    )
    assert seen == plain_ids and bos not in seen
    # Default rule: a fixed template is plain text, tokenised as TRL tokenises it, so the BOS is added.
    assert _prompt_ids_seen_by_the_model(model, bos_tokenizer, prompt, prompt_template=SPIN_TEMPLATE) == [
        bos,
        *plain_ids,
    ]
    # Default rule for a chat-templated prompt: no special tokens added; forcing True adds the BOS.
    chat_ids = bos_tokenizer(format_prompt(bos_tokenizer, prompt), add_special_tokens=False)["input_ids"]
    assert _prompt_ids_seen_by_the_model(model, bos_tokenizer, prompt) == chat_ids
    assert _prompt_ids_seen_by_the_model(model, bos_tokenizer, prompt, add_special_tokens=True) == [bos, *chat_ids]
    assert encode_prompt(bos_tokenizer, prompt, SPIN_TEMPLATE, add_special_tokens=False) == plain_ids


def _sppo_apply_template(text, tokenizer):
    """Oracle: `apply_template` of uclaml/SPPO `scripts/rank.py`, the source text it gives PairRM (its misspelt
    `add_generate_prompt` keyword included: the template never reads it)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}, {"role": "assistant", "content": "None"}],
        tokenize=False,
        add_generate_prompt=True,
    ).split("None")[0]


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_judge_source_text_is_sppo_apply_template(tokenizer, tiny_model_path):
    mistral = _bos_tokenizer(tiny_model_path)
    mistral.chat_template = MISTRAL_TEMPLATE
    prompts = ["Name a colour.", "Explain {braces} and\nnew lines.", "Is None a value?"]
    for tok in (tokenizer, mistral):
        for prompt in prompts:
            assert judge_source_text(tok, prompt, cut_at_first_none=True) == _sppo_apply_template(prompt, tok)
            if "None" not in prompt:
                assert judge_source_text(tok, prompt) == _sppo_apply_template(prompt, tok)
    # Worked by hand: the user turn with the assistant header, cut before the assistant content.
    assert judge_source_text(tokenizer, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert judge_source_text(mistral, "Hi") == "<|endoftext|>[INST] Hi [/INST]"
    # The original also cuts a prompt at its own "None"; the default cuts only before the assistant content.
    assert judge_source_text(mistral, "Is None a value?", cut_at_first_none=True) == "<|endoftext|>[INST] Is "
    assert judge_source_text(mistral, "Is None a value?") == "<|endoftext|>[INST] Is None a value? [/INST]"
    # A conversation gets the assistant turn after its last message; a fixed template is just filled in.
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    expected = "<|endoftext|>[INST] Hi [/INST]Hello<|im_end|>[INST] Bye [/INST]"
    assert judge_source_text(mistral, conversation) == expected
    assert judge_source_text(tokenizer, "Hi", SPIN_TEMPLATE) == format_prompt(tokenizer, "Hi", SPIN_TEMPLATE)
    with pytest.raises(ValueError, match="prompt_template"):
        judge_source_text(tokenizer, "Hi", "no placeholder")
    user_only = _bos_tokenizer(tiny_model_path)
    user_only.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="assistant turn"):
        judge_source_text(user_only, "Hi")


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
        ({"add_special_tokens": "no"}, "add_special_tokens"),
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


GENERATION_DIR = REPO / "trl_selfplay" / "generation"
LOADER = "trl_selfplay.models"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the submodule `pkg.mod` (and runs `pkg/__init__.py`).
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            names = []
        found.update(n for n in names if n.startswith("trl_selfplay") and n in known | {"trl_selfplay"})
    return found


def test_generation_imports_form_no_circle():
    paths = {_module_name(p): p for p in sorted(GENERATION_DIR.glob("*.py"))}
    paths[LOADER] = REPO / "trl_selfplay" / "models.py"
    graph = {name: _package_imports(path, set(paths)) for name, path in paths.items()}
    # Shared pieces import nothing else of the package; backends and the dispatcher import only generation + loader.
    for leaf in ("trl_selfplay.generation.prompts", "trl_selfplay.generation.seeding", LOADER):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert graph["trl_selfplay.generation.base"] == {"trl_selfplay.generation.prompts"}
    assert all(target in paths for targets in graph.values() for target in targets), graph
    # Depth-first search for a back edge.
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            assert state.get(target) != "open", f"import circle: {' -> '.join([*stack, node, target])}"
            if target not in state:
                visit(target, [*stack, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])

    # And each module imports on its own, with no trl_selfplay module loaded before it.
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(paths)!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('trl_selfplay')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
