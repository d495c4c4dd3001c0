"""PairRM (llm-blender) on `transformers.DebertaV2Model`, loading the original checkpoints unchanged.

The `llm-blender` package does not import with transformers 5, so this file carries the model: a DeBERTa-v3 encoder
(`pretrained_model.*`) and a two-layer head (`head_layer.*`) scoring [h_source; h_candidate] at the positions of the
`<|source|>`, `<|candidate1|>`, `<|candidate2|>` tokens. logit(y1, y2) = head(src, c1) − head(src, c2) and
P(y1 ≻ y2 | x) = σ(logit). See `docs/methods.md`.

Unlike the original pipeline (one prompt per forward, one pair at a time), every ordered pair of every prompt is
built up front, sorted by length and run through the encoder in batches of `batch_size` pairs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trl_selfplay.judges.base import PreferenceJudge, check_judge_inputs
from trl_selfplay.judges.preferences import PREFERENCE_MODES, preference_record

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "<|source|>"
CANDIDATE1_PREFIX = "<|candidate1|>"
CANDIDATE2_PREFIX = "<|candidate2|>"
CANDIDATE_PREFIX = "<|candidate|>"
PREFIX_TOKENS = (SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX, CANDIDATE_PREFIX)

# microsoft/deberta-v3-large, the backbone the original checkpoint names in its ranker config (the same values are in
# llm-blender/PairRM-hf's config.json). Carried here so loading `llm-blender/PairRM` needs no second download;
# `vocab_size` always comes from the checkpoint (llm-blender resized the embeddings to its tokenizer).
DEBERTA_V3_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "pad_token_id": 0,
    "pooler_dropout": 0,
    "pooler_hidden_act": "gelu",
    "pooler_hidden_size": 1024,
}
KNOWN_BACKBONES = {"microsoft/deberta-v3-large": DEBERTA_V3_LARGE}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Which file the original loader reads when a directory holds both: llm-blender's `load_ranker`
# (llm_blender/blender/blender_utils.py) tries `pytorch_model.bin` first for its own layout; the `-hf` layout is
# loaded by transformers' `from_pretrained`, which prefers safetensors.
WEIGHT_ORDER = {"original": ("pytorch_model.bin", "model.safetensors"), "hf": WEIGHT_FILES}
# Token budgets when a checkpoint's config does not give them (llm-blender/PairRM's ranker config values).
DEFAULT_SOURCE_MAXLENGTH = 1224
DEFAULT_CANDIDATE_MAXLENGTH = 412
# Buffers some transformers versions saved although they are recomputed at init; ignoring them loses nothing.
LEGACY_BUFFER_KEYS = {"pretrained_model.embeddings.position_ids"}
MODES = PREFERENCE_MODES


class PairRMModel(nn.Module):
    """PairRM's network; parameter names match the original checkpoints (`pretrained_model.*`, `head_layer.*`)."""

    def __init__(self, config, n_tasks: int = 1, drop_out: float = 0.05):
        from transformers import DebertaV2Model

        super().__init__()
        self.pretrained_model = DebertaV2Model(config)
        hidden = config.hidden_size
        self.head_layer = nn.Sequential(
            nn.Dropout(drop_out),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(drop_out),
            nn.Linear(hidden, n_tasks),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        source_positions: torch.Tensor,
        candidate1_positions: torch.Tensor,
        candidate2_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Return logit(y1, y2) per row, shape [B]."""
        hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        source = hidden[rows, source_positions]
        left = self.head_layer(torch.cat([source, hidden[rows, candidate1_positions]], dim=-1))
        right = self.head_layer(torch.cat([source, hidden[rows, candidate2_positions]], dim=-1))
        return (left - right).mean(dim=-1)  # mean over tasks, as the original (n_tasks = 1)


def _read_config(path: Path) -> dict[str, Any]:
    for name in ("config.json", "ranker_config.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    raise ValueError(f"No config.json in {path}; is it a PairRM checkpoint directory?")


def _layout(config: dict[str, Any]) -> str:
    return "hf" if config.get("model_type") == "deberta-v2" else "original"


def _resolve_path(model_name_or_path: str) -> Path:
    if os.path.isdir(model_name_or_path):
        return Path(model_name_or_path)
    from huggingface_hub import snapshot_download

    # Config and tokenizer, then ONE weights file, the one the original loader reads (the repos also hold pickled
    # training files).
    patterns = ["*.json", "*.model"]
    path = Path(snapshot_download(repo_id=model_name_or_path, allow_patterns=patterns))
    for name in WEIGHT_ORDER[_layout(_read_config(path))]:
        path = Path(snapshot_download(repo_id=model_name_or_path, allow_patterns=[*patterns, name]))
        if (path / name).exists():
            break
    return path


def _read_state_dict(path: Path, layout: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict and the file it came from, trying the files in the original loader's order."""
    for name in WEIGHT_ORDER[layout]:
        file = path / name
        if not file.exists():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(file)), name
        return torch.load(file, map_location="cpu", weights_only=True), name
    raise ValueError(f"No PairRM weights in {path}: expected one of {WEIGHT_FILES}.")


def _backbone_config(path: Path, config: dict[str, Any]):
    """The backbone's DebertaV2Config and the layout (`"original"` or `"hf"`) of a PairRM checkpoint directory."""
    from transformers import AutoConfig, DebertaV2Config

    if config.get("model_type") == "deberta-v2":  # `-hf` layout: a DeBERTa config plus PairRM's fields
        return DebertaV2Config.from_dict(config), "hf"
    if config.get("ranker_type") is None:
        raise ValueError(
            f"{path} is not a PairRM checkpoint: its config has neither `model_type: deberta-v2` (llm-blender/PairRM-hf "
            "layout) nor `ranker_type` (llm-blender/PairRM layout)."
        )
    if config["ranker_type"] != "pairranker":
        raise ValueError(f"Only llm-blender's `pairranker` is supported, got ranker_type={config['ranker_type']!r}.")
    backbone = config.get("model_name", "microsoft/deberta-v3-large")
    if backbone in KNOWN_BACKBONES:
        return DebertaV2Config(**KNOWN_BACKBONES[backbone]), "original"
    local = path / backbone
    return AutoConfig.from_pretrained(str(local) if local.is_dir() else backbone), "original"


def load_pairrm(
    model_name_or_path: str, *, device: Any = None, dtype: torch.dtype | None = None
) -> tuple[PairRMModel, Any, dict[str, Any]]:
    """Load a PairRM checkpoint (original or `-hf` layout, `.bin` or safetensors) with strict key matching.

    When the directory holds both `pytorch_model.bin` and `model.safetensors`, the file the original loader reads
    is loaded: `pytorch_model.bin` for llm-blender's layout (`load_ranker`), `model.safetensors` for the `-hf`
    layout (transformers' `from_pretrained`).

    Returns the model (eval mode), its tokenizer and a dict of facts (`layout`, token ids, `config`, `path`,
    `weights_file`, and the checkpoint's token budgets `source_maxlength` / `candidate_maxlength`).
    """
    from transformers import AutoTokenizer

    path = _resolve_path(model_name_or_path)
    raw_config = _read_config(path)
    backbone_config, layout = _backbone_config(path, raw_config)

    state_dict, weights_file = _read_state_dict(path, layout)
    if all((path / name).exists() for name in WEIGHT_FILES):
        logger.info(f"{path} holds both {WEIGHT_FILES}; loading {weights_file}, as the original loader does.")
    for key in LEGACY_BUFFER_KEYS & state_dict.keys():
        del state_dict[key]
    embedding_key = "pretrained_model.embeddings.word_embeddings.weight"
    if embedding_key not in state_dict:
        raise ValueError(
            f"{path} has no `{embedding_key}`: not a PairRM state dict (keys must be `pretrained_model.*`)."
        )
    backbone_config.vocab_size = state_dict[embedding_key].shape[0]

    model = PairRMModel(
        backbone_config, n_tasks=int(raw_config.get("n_tasks", 1)), drop_out=float(raw_config.get("drop_out", 0.05))
    )
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"PairRM checkpoint {path} does not match the model: {len(missing)} missing keys {missing[:10]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:10]}."
        )
    model.load_state_dict(state_dict, strict=True)

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = {}
    for token in PREFIX_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"The PairRM tokenizer in {path} lacks the special token {token!r}.")
        ids[token] = token_id
    if layout == "hf":  # the -hf config repeats the ids; a mismatch means tokenizer and weights disagree
        for field, token in [
            ("source_prefix_id", SOURCE_PREFIX),
            ("cand1_prefix_id", CANDIDATE1_PREFIX),
            ("cand2_prefix_id", CANDIDATE2_PREFIX),
            ("cand_prefix_id", CANDIDATE_PREFIX),
        ]:
            if field in raw_config and raw_config[field] != ids[token]:
                raise ValueError(f"config.json says {field}={raw_config[field]} but the tokenizer has {ids[token]}.")
    if tokenizer.sep_token is None:
        raise ValueError(f"The PairRM tokenizer in {path} has no sep token.")

    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    budgets = {
        "source_maxlength": int(raw_config.get("source_maxlength") or DEFAULT_SOURCE_MAXLENGTH),
        "candidate_maxlength": int(raw_config.get("candidate_maxlength") or DEFAULT_CANDIDATE_MAXLENGTH),
    }
    info = {"layout": layout, "token_ids": ids, "config": raw_config, "path": path, "weights_file": weights_file}
    return model, tokenizer, {**info, **budgets}


def _check_budget(name: str, value: int | None) -> None:
    if value is not None and not (isinstance(value, int) and value >= 4):
        raise ValueError(f"`{name}` must be an integer of at least 4 tokens, got {value!r}.")


class PairRMJudge(PreferenceJudge):
    """PairRM (llm-blender/PairRM), the judge of the RSPO and SPPO papers, as a batched K×K preference judge.

    Args:
        model_name_or_path: Hub name (`llm-blender/PairRM`, `llm-blender/PairRM-hf`) or a local directory with the
            same files (config, weights as `model.safetensors` or `pytorch_model.bin`, tokenizer).
        batch_size: ordered pairs per forward pass.
        debias: with `mode="pairwise"`, score both orders and use P_ij = σ(l(i,j) − l(j,i)), so P_ij + P_ji = 1
            exactly (what llm-blender's `compare` does); `False` keeps one order, P_ij = σ(l(i,j)).
        mode: `"pairwise"` (above) or `"aggregate"`: the original SPPO/RSPO pipeline's probabilities
            σ(s_i − s_j) from scores s_i = mean_j (l(i,j) − l(j,i)) aggregated over the whole candidate set
            (llm-blender's `rank(..., return_scores=True)`, "max_logits" policy).
        max_source_length: token budget of `[CLS]<|source|> prompt [SEP]`. `None` (default) reads the checkpoint's
            `source_maxlength` (1224 for llm-blender/PairRM), as llm-blender's `rank` does (its `source_max_length`
            argument, else the ranker config's value); 1224 when the config has none.
        max_candidate_length: token budget of each `[CLS]<|candidate|> response [SEP]`, plus half of the source
            budget the prompt leaves unused. `None` (default) reads the checkpoint's `candidate_maxlength` (412).
        device, dtype: where and in which precision to run (default: CUDA if available, float32).
    """

    def __init__(
        self,
        model_name_or_path: str = "llm-blender/PairRM",
        *,
        batch_size: int = 32,
        debias: bool = True,
        mode: str = "pairwise",
        max_source_length: int | None = None,
        max_candidate_length: int | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        _check_budget("max_source_length", max_source_length)
        _check_budget("max_candidate_length", max_candidate_length)
        self.batch_size = batch_size
        self.debias = debias
        self.mode = mode
        self.model, self.tokenizer, info = load_pairrm(model_name_or_path, device=device, dtype=dtype)
        self.max_source_length = max_source_length if max_source_length is not None else info["source_maxlength"]
        self.max_candidate_length = (
            max_candidate_length if max_candidate_length is not None else info["candidate_maxlength"]
        )
        _check_budget("source_maxlength (checkpoint config)", self.max_source_length)
        _check_budget("candidate_maxlength (checkpoint config)", self.max_candidate_length)
        self.layout = info["layout"]
        self.token_ids = info["token_ids"]
        self.device = next(self.model.parameters()).device

    # -- tokenisation -------------------------------------------------------------------------------------------------
    def _encode(self, text: str, prefix: str, max_length: int) -> list[int]:
        # The sep token inside user text would read as a segment boundary: llm-blender replaces it by a space.
        text = text.replace(self.tokenizer.sep_token, " ")
        return self.tokenizer(prefix + text, max_length=max_length, truncation=True)["input_ids"]

    def encode_prompt(self, prompt: str, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the source and of each candidate, truncated as llm-blender truncates them.

        llm-blender's `CrossCompareCollator.__call__` (llm_blender/pair_ranker/collator.py) encodes the source with
        `max_length=source_maxlength`, then the candidates with
        `max_length=candidate_maxlength + (source_maxlength - source_length) // 2`, where source_length is the
        longest source of the collated batch; the SPPO/RSPO pipeline collates one prompt at a time, so it is this
        prompt's own length here.
        """
        source = self._encode(prompt, SOURCE_PREFIX, self.max_source_length)
        candidate_budget = self.max_candidate_length + (self.max_source_length - len(source)) // 2
        return source, [self._encode(c, CANDIDATE_PREFIX, candidate_budget) for c in candidates]

    def _pair(self, source: list[int], first: list[int], second: list[int]) -> tuple[list[int], int, int, int]:
        candidate_id = self.token_ids[CANDIDATE_PREFIX]
        first = [self.token_ids[CANDIDATE1_PREFIX] if t == candidate_id else t for t in first]
        second = [self.token_ids[CANDIDATE2_PREFIX] if t == candidate_id else t for t in second]
        # Positions are found inside each segment, so the literal prefix strings in user text cannot move them.
        src_pos = source.index(self.token_ids[SOURCE_PREFIX])
        c1_pos = len(source) + first.index(self.token_ids[CANDIDATE1_PREFIX])
        c2_pos = len(source) + len(first) + second.index(self.token_ids[CANDIDATE2_PREFIX])
        return source + first + second, src_pos, c1_pos, c2_pos

    # -- scoring ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def pair_logits(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """l[n, i, j] = PairRM's logit that y_i (shown first) beats y_j (shown second); diagonal 0. Shape [N, K, K]."""
        from tqdm.auto import tqdm

        k = check_judge_inputs(prompts, completions)
        logits = torch.zeros(len(prompts), k, k, dtype=torch.float32)
        if k < 2:
            return logits
        # Prompts are taken in chunks of about 32 batches of pairs: enough to sort pairs by length (little padding)
        # without holding the token ids of a whole dataset's pairs in memory.
        chunk = max(1, (32 * self.batch_size) // (k * (k - 1)))
        bar = tqdm(total=len(prompts) * k * (k - 1), desc="PairRM", unit="pair")
        for first in range(0, len(prompts), chunk):
            pairs = []  # (length, n, i, j, ids, src_pos, c1_pos, c2_pos)
            for n in range(first, min(first + chunk, len(prompts))):
                source, encoded = self.encode_prompt(prompts[n], list(completions[n]))
                for i in range(k):
                    for j in range(k):
                        if i != j:
                            ids, sp, p1, p2 = self._pair(source, encoded[i], encoded[j])
                            pairs.append((len(ids), n, i, j, ids, sp, p1, p2))
            pairs.sort(key=lambda p: -p[0])
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[start : start + self.batch_size]
                for value, pair in zip(self._forward_batch(batch), batch):
                    logits[pair[1], pair[2], pair[3]] = value
                bar.update(len(batch))
        bar.close()
        return logits

    def _forward_batch(self, batch: list[tuple]) -> list[float]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(p[0] for p in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, pair in enumerate(batch):  # right padding, as llm-blender's `cat_ids`
            input_ids[row, : pair[0]] = torch.tensor(pair[4])
            attention_mask[row, : pair[0]] = 1
        positions = torch.tensor([[p[5], p[6], p[7]] for p in batch], device=self.device)
        out = self.model(
            input_ids.to(self.device),
            attention_mask.to(self.device),
            positions[:, 0],
            positions[:, 1],
            positions[:, 2],
        )
        return out.float().cpu().tolist()

    def scores(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """Aggregated candidate scores s[n, i] = mean_j (l(i,j) − l(j,i)) (llm-blender's `rank`, max_logits)."""
        logits = self.pair_logits(prompts, completions)
        return (logits - logits.transpose(1, 2)).mean(dim=-1)

    def preference_matrix(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        """P[n, i, j] = P(y_i ≻ y_j | x_n), shape [N, K, K], diagonal ½ (see the class docstring for the modes)."""
        return self._matrix(self.pair_logits(prompts, completions))

    def preferences(self, prompts: list[str], completions: list[list[str]]) -> list[dict[str, Any]]:
        """One record per prompt (see `PreferenceJudge.preferences`), from ONE PairRM pass: `scores` are always
        included (they are free given the pair logits)."""
        logits = self.pair_logits(prompts, completions)
        scores = (logits - logits.transpose(1, 2)).mean(dim=-1)
        if self.mode == "aggregate":
            return [preference_record("aggregate", scores=row) for row in scores]
        return [
            preference_record("pairwise", preferences=matrix, scores=row)
            for matrix, row in zip(self._matrix(logits), scores)
        ]

    def _matrix(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "aggregate":
            s = (logits - logits.transpose(1, 2)).mean(dim=-1)
            return torch.sigmoid(s[:, :, None] - s[:, None, :])
        probs = torch.sigmoid(logits - logits.transpose(1, 2)) if self.debias else torch.sigmoid(logits)
        eye = torch.eye(probs.shape[-1], dtype=torch.bool)
        return probs.masked_fill(eye, 0.5)
