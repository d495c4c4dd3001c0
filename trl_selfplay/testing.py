"""Tiny models and tokenizers built locally, for smoke tests without a GPU or the Hugging Face Hub.

Everything here is saved to a directory and meant to be loaded back *by path* with the ordinary
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, exactly as a user's model would be.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# ChatML-style template: the rendered prompt (with the generation prompt) is a prefix of prompt + answer,
# which TRL's tokenisation relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

DEFAULT_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns to tell its own answers from the annotated ones.
Self-play fine-tuning turns a weak language model into a stronger one, iteration after iteration.
What is the capital of France? The capital of France is Paris. How many legs does a spider have? Eight.
Write a short poem about the sea. The sea is wide and blue, the waves come in and go out again.
Explain gravity to a child. Things fall down because the Earth pulls them towards its centre.
user assistant system hello thank you please answer question response instruction prompt
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) . , ! ? : ; ' "
one two three four five six seven eight nine ten red green blue yellow cat dog bird fish tree house
"""


def _corpus_lines(vocab_corpus: Iterable[str] | str | None) -> Iterable[str]:
    """The builders' `vocab_corpus`: the built-in corpus by default, a string split into lines."""
    if vocab_corpus is None:
        vocab_corpus = DEFAULT_CORPUS
    return vocab_corpus.splitlines() if isinstance(vocab_corpus, str) else vocab_corpus


def _train_tokenizer(corpus: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


def make_tiny_causal_lm(
    path: str | os.PathLike,
    vocab_corpus: Iterable[str] | str | None = None,
    *,
    architecture: str = "qwen2",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random causal LM plus a locally trained byte-level BPE tokenizer.

    Args:
        path: directory to write `config.json`, weights, `tokenizer.json` and the chat template to.
        vocab_corpus: text the tokenizer is trained on (a string or an iterable of strings); a small built-in
            English corpus when `None`.
        architecture: `"qwen2"` or `"llama"`.
        vocab_size: target BPE vocabulary size (the trained vocabulary can be smaller on a tiny corpus).
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size: model shape.
            The default head dimension is 32, the smallest vLLM's CPU attention accepts.
        seed: seed of the random initialisation, so the same call builds the same weights.

    Returns:
        The directory, loadable offline with `AutoModelForCausalLM.from_pretrained(path)` and
        `AutoTokenizer.from_pretrained(path)`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(_corpus_lines(vocab_corpus), vocab_size)

    if architecture not in ("qwen2", "llama"):
        raise ValueError(f"`architecture` must be 'qwen2' or 'llama', got {architecture!r}.")
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PAIRRM_LAYOUTS = ("original", "hf")
PAIRRM_WEIGHT_FORMATS = ("bin", "safetensors")


def make_tiny_pairrm(
    path: str | os.PathLike,
    *,
    layout: str = "original",
    weights_format: str = "safetensors",
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    vocab_corpus: Iterable[str] | str | None = None,
    vocab_size: int = 150,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random PairRM checkpoint in llm-blender's file layout, loadable by `PairRMJudge(path)`.

    Args:
        path: directory to write to.
        layout: `"original"` (llm-blender/PairRM: a ranker `config.json` naming the backbone, here the `backbone/`
            subdirectory) or `"hf"` (llm-blender/PairRM-hf: a DeBERTa-v2 `config.json` with PairRM's fields).
        weights_format: `"safetensors"` (`model.safetensors`) or `"bin"` (`pytorch_model.bin`).
        hidden_size, num_hidden_layers, num_attention_heads: encoder shape (DeBERTa-v3 attention settings).
        vocab_corpus, vocab_size: text and size of the sentencepiece vocabulary trained for the tokenizer.
        seed: seed of the random initialisation.
    """
    import json
    import shutil
    import tempfile

    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer, DebertaV2Config

    from trl_selfplay.judges.pairrm import PREFIX_TOKENS, PairRMModel

    if layout not in PAIRRM_LAYOUTS:
        raise ValueError(f"`layout` must be one of {PAIRRM_LAYOUTS}, got {layout!r}.")
    if weights_format not in PAIRRM_WEIGHT_FORMATS:
        raise ValueError(f"`weights_format` must be one of {PAIRRM_WEIGHT_FORMATS}, got {weights_format!r}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = [line for line in _corpus_lines(vocab_corpus) if line.strip()]

    # A sentencepiece model with DeBERTa-v3's special tokens ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3), converted by
    # transformers like microsoft/deberta-v3-large's spm.model, then PairRM's four added tokens.
    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines * 4),
            model_prefix=f"{tmp}/spm",
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            pad_piece="[PAD]",
            bos_piece="[CLS]",
            eos_piece="[SEP]",
            unk_piece="[UNK]",
            user_defined_symbols=["[MASK]"],
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        shutil.copy(f"{tmp}/spm.model", path / "spm.model")
        tokenizer_config = {
            "tokenizer_class": "DebertaV2Tokenizer",
            "do_lower_case": False,
            "split_by_punct": False,
            "vocab_type": "spm",
            "bos_token": "[CLS]",
            "eos_token": "[SEP]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.add_tokens(list(PREFIX_TOKENS))
    tokenizer.save_pretrained(path)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PREFIX_TOKENS}

    backbone = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        pad_token_id=0,
        # Larger than DeBERTa's 0.02 so a random tiny model's scores depend clearly on the text.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = PairRMModel(backbone, n_tasks=1, drop_out=0.05)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path / "model.safetensors"))
    else:
        torch.save(state_dict, path / "pytorch_model.bin")

    if layout == "original":
        backbone.save_pretrained(path / "backbone")
        ranker_config = {
            "ranker_type": "pairranker",
            "model_type": "deberta",
            "model_name": "backbone",  # llm-blender names the Hub backbone here; relative to the checkpoint dir
            "source_maxlength": 1224,
            "candidate_maxlength": 412,
            "n_tasks": 1,
            "drop_out": 0.05,
            "inference_mode": "bubble",
        }
        for name in ("config.json", "ranker_config.json"):
            (path / name).write_text(json.dumps(ranker_config, indent=2))
    else:
        config = backbone.to_dict()
        config.update(
            architectures=["DebertaV2PairRM"],
            n_tasks=1,
            drop_out=0.05,
            source_prefix_id=token_ids["<|source|>"],
            cand1_prefix_id=token_ids["<|candidate1|>"],
            cand2_prefix_id=token_ids["<|candidate2|>"],
            cand_prefix_id=token_ids["<|candidate|>"],
        )
        config.pop("sep_token_id", None)  # llm-blender/PairRM-hf ships a config without it
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
