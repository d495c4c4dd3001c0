"""Workloads of the training-step benchmarks (issues 3, 7 and 15): a random Llama model of a given shape
saved to a directory (loaded back by path, as a user's model is) and a preference dataset of random tokens.

The tokenizer is a word-level one whose words are `w<id>`, so a text of n words is exactly n tokens: the sequences
have the same length under every trainer (e.g. prompt 64 + completion 192 tokens, the last completion token being EOS).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
NUM_SPECIAL = 3


@dataclass(frozen=True)
class Workload:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_examples: int = 64
    prompt_length: int = 64
    completion_length: int = 192  # including the EOS TRL appends
    batch_size: int = 4  # pairs per step
    learning_rate: float = 1e-6
    beta: float = 0.1
    description: str = ""


WORKLOADS = {
    "W1": Workload("W1", 32_000, 256, 688, 4, 8, description="Llama, vocab 32,000, hidden 256, 4 layers, 19.5M"),
    "W2": Workload(
        "W2", 8_192, 512, 688, 4, 8, description="W1 with vocab 8,192 and hidden 512 (smaller LM-head share)"
    ),
    # Issue 15 (prefix sharing): the W1 model with long prompts and short responses, as in multi-turn contexts.
    "W3": Workload(
        "W3",
        32_000,
        256,
        688,
        4,
        8,
        prompt_length=512,
        completion_length=128,
        description="the W1 model, prompt 512 + two 128-token responses",
    ),
    # Smoke-test size (`--quick`): same pipeline, seconds per run.
    "tiny": Workload("tiny", 1_024, 64, 176, 2, 4, num_examples=16, prompt_length=16, completion_length=48),
}


def build_model_dir(workload: Workload, root: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random `LlamaForCausalLM` of the workload's shape (fp32, untied embeddings) and its word-level
    tokenizer to `root/<name>`; reuse the directory when it already holds this exact workload."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(root) / workload.name
    stamp = path / "workload.json"
    spec = {**asdict(workload), "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    path.mkdir(parents=True, exist_ok=True)

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    vocab.update({f"w{i}": i for i in range(NUM_SPECIAL, workload.vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=workload.vocab_size,
        hidden_size=workload.hidden_size,
        intermediate_size=workload.intermediate_size,
        num_hidden_layers=workload.num_hidden_layers,
        num_attention_heads=workload.num_attention_heads,
        num_key_value_heads=workload.num_attention_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(spec))
    return path


def random_token_ids(workload: Workload, seed: int = 0) -> dict[str, list[list[int]]]:
    """Token ids (no special tokens) of the prompts and of both completions, EOS excluded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, vocab = workload.num_examples, workload.vocab_size
    body = workload.completion_length - 1  # TRL appends EOS to each completion
    return {
        "prompt": rng.integers(NUM_SPECIAL, vocab, size=(n, workload.prompt_length)).tolist(),
        "chosen": rng.integers(NUM_SPECIAL, vocab, size=(n, body)).tolist(),
        "rejected": rng.integers(NUM_SPECIAL, vocab, size=(n, body)).tolist(),
    }


def preference_dataset(workload: Workload, seed: int = 0, win_probs: bool = False, anchor_samples: bool = False):
    """TRL-style `prompt` / `chosen` / `rejected` text dataset of random words (plus random RSPO win-prob columns,
    and with `anchor_samples` an `anchor_completion` column: the chosen words of the next example, same length)."""
    import numpy as np
    from datasets import Dataset

    ids = random_token_ids(workload, seed)

    def text(row: list[int], lead: str = "") -> str:
        return lead + " ".join(f"w{i}" for i in row)

    columns = {
        "prompt": [text(row) for row in ids["prompt"]],
        "chosen": [text(row, " ") for row in ids["chosen"]],
        "rejected": [text(row, " ") for row in ids["rejected"]],
    }
    if win_probs:
        rng = np.random.default_rng(seed + 1)
        columns["chosen_win_prob"] = rng.uniform(0.0, 1.0, workload.num_examples).tolist()
        columns["rejected_win_prob"] = rng.uniform(0.0, 1.0, workload.num_examples).tolist()
    if anchor_samples:
        columns["anchor_completion"] = columns["chosen"][1:] + columns["chosen"][:1]
    return Dataset.from_dict(columns)


def run_meta(script: str, argv: list[str] | None, **fields) -> dict:
    """The header of a benchmark's result file: its command line, `fields`, the start time and the load average."""
    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return {
        "command": command.strip(),
        **fields,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def training_args(workload: Workload, name: str, steps: int, seed: int = 0) -> dict:
    """The trainer-config keyword arguments every training benchmark shares (a fresh output directory each)."""
    import tempfile

    return dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench_{name}_"),
        per_device_train_batch_size=workload.batch_size,
        max_steps=steps,
        learning_rate=workload.learning_rate,
        optim="rmsprop",
        beta=workload.beta,
        gradient_checkpointing=False,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
