"""Judges: PairRM on tiny local checkpoints in llm-blender's layouts, and the callable judge."""

import shutil

import pytest
import torch

from trl_selfplay.judges import PairRMJudge, RewardFunctionJudge, load_pairrm
from trl_selfplay.testing import make_tiny_pairrm

PROMPTS = ["What is the capital of France?", "Explain gravity to a child."]
COMPLETIONS = [
    ["Paris.", "The capital of France is Paris.", "Paris.", "London is big"],
    ["Things fall down.", "The Earth pulls things towards its centre.", "Gravity!", "I do not know"],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny weights (seed 0) saved in every layout/format combination."""
    root = tmp_path_factory.mktemp("pairrm")
    return {
        (layout, fmt): str(make_tiny_pairrm(root / f"{layout}-{fmt}", layout=layout, weights_format=fmt))
        for layout in ("original", "hf")
        for fmt in ("safetensors", "bin")
    }


@pytest.fixture(scope="module")
def judge(checkpoints):
    return PairRMJudge(checkpoints[("original", "safetensors")], batch_size=5)


def test_loads_every_layout_and_format_to_the_same_model(checkpoints, judge):
    reference = judge.preference_matrix(PROMPTS, COMPLETIONS)
    for (layout, fmt), path in checkpoints.items():
        other = PairRMJudge(path, batch_size=5)
        assert other.layout == layout
        assert torch.allclose(other.preference_matrix(PROMPTS, COMPLETIONS), reference, atol=1e-6), (layout, fmt)


def test_checkpoint_keys_follow_the_original_layout(checkpoints):
    from safetensors.torch import load_file

    path = checkpoints[("original", "safetensors")]
    state = load_file(f"{path}/model.safetensors")
    assert all(k.startswith(("pretrained_model.", "head_layer.")) for k in state)
    head = {k: tuple(v.shape) for k, v in state.items() if k.startswith("head_layer.")}
    hidden = state["pretrained_model.embeddings.word_embeddings.weight"].shape[1]
    # Sequential(Dropout, Linear(2H -> H), Tanh, Dropout, Linear(H -> 1)): parameters at indices 1 and 4.
    assert head == {
        "head_layer.1.weight": (hidden, 2 * hidden),
        "head_layer.1.bias": (hidden,),
        "head_layer.4.weight": (1, hidden),
        "head_layer.4.bias": (1,),
    }
    assert "pretrained_model.encoder.rel_embeddings.weight" in state


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_strict_loading_fails_loudly(checkpoints, tmp_path, fmt):
    from safetensors.torch import load_file, save_file

    src = checkpoints[("hf", fmt)]
    weights = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    state = load_file(f"{src}/{weights}") if fmt == "safetensors" else torch.load(f"{src}/{weights}")

    def write(variant, name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        if fmt == "safetensors":
            save_file(variant, str(dst / weights))
        else:
            torch.save(variant, dst / weights)
        return str(dst)

    missing = {k: v for k, v in state.items() if k != "head_layer.4.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys \['head_layer.4.bias'\]"):
        load_pairrm(write(missing, "missing"))
    extra = {**state, "head_layer.5.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 unexpected keys \['head_layer.5.weight'\]"):
        load_pairrm(write(extra, "extra"))
    renamed = {k.replace("pretrained_model.", "deberta."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="pretrained_model"):
        load_pairrm(write(renamed, "renamed"))
    # A buffer older transformers versions saved is known and harmless.
    legacy = {**state, "pretrained_model.embeddings.position_ids": torch.arange(512)[None]}
    load_pairrm(write(legacy, "legacy"))


def test_missing_special_tokens_fail(checkpoints, tmp_path):
    dst = tmp_path / "no-tokens"
    shutil.copytree(checkpoints[("original", "bin")], dst)
    (dst / "tokenizer.json").write_text(
        (dst / "tokenizer.json").read_text().replace("<|candidate2|>", "<|candidateX|>")
    )
    with pytest.raises(ValueError, match=r"<\|candidate2\|>"):
        load_pairrm(str(dst))


def test_debiased_preferences(judge):
    probs = judge.preference_matrix(PROMPTS, COMPLETIONS)
    assert probs.shape == (2, 4, 4)
    eye = torch.eye(4, dtype=torch.bool).expand(2, 4, 4)
    assert torch.all(probs[eye] == 0.5)
    assert torch.allclose(probs + probs.transpose(1, 2), torch.ones_like(probs), atol=1e-6)
    assert (probs - 0.5).abs().max() > 0.01  # the tiny model does discriminate
    # Candidates 0 and 2 of the first prompt are the same text: ½ between them, same row against the others.
    assert probs[0, 0, 2] == pytest.approx(0.5, abs=1e-6)
    assert torch.allclose(probs[0, 0, [1, 3]], probs[0, 2, [1, 3]], atol=1e-5)


def test_prompt_of_identical_candidates_gives_half(judge):
    probs = judge.preference_matrix(["hello"], [["the same answer"] * 3])
    assert torch.allclose(probs, torch.full_like(probs, 0.5), atol=1e-6)


def test_forward_matches_the_documented_computation(judge):
    """logit(y1, y2) = head([h_src; h_c1]) − head([h_src; h_c2]) at the prefix tokens of [src][c1][c2]."""
    tok, ids = judge.tokenizer, judge.token_ids
    prompt, (a, b) = PROMPTS[0], COMPLETIONS[0][:2]
    source = tok("<|source|>" + prompt)["input_ids"]
    first = tok("<|candidate1|>" + a)["input_ids"]
    second = tok("<|candidate2|>" + b)["input_ids"]
    assert source[:2] == [tok.cls_token_id, ids["<|source|>"]] and source[-1] == tok.sep_token_id
    input_ids = torch.tensor([source + first + second])
    with torch.no_grad():
        hidden = judge.model.pretrained_model(input_ids=input_ids).last_hidden_state[0]
        src, c1, c2 = hidden[1], hidden[len(source) + 1], hidden[len(source) + len(first) + 1]
        expected = judge.model.head_layer(torch.cat([src, c1])) - judge.model.head_layer(torch.cat([src, c2]))
    logits = judge.pair_logits([prompt], [[a, b]])
    assert logits[0, 0, 1].item() == pytest.approx(expected.item(), abs=1e-5)


def test_one_order_and_aggregate_modes(checkpoints, judge):
    logits = judge.pair_logits(PROMPTS, COMPLETIONS)
    path = checkpoints[("original", "safetensors")]
    one_order = PairRMJudge(path, debias=False).preference_matrix(PROMPTS, COMPLETIONS)
    off = ~torch.eye(4, dtype=torch.bool).expand(2, 4, 4)
    assert torch.allclose(one_order[off], torch.sigmoid(logits)[off], atol=1e-6)
    assert torch.all(one_order[~off] == 0.5)
    # One order keeps PairRM's position bias: P_ij + P_ji is not 1.
    assert ((one_order + one_order.transpose(1, 2))[off] - 1).abs().max() > 1e-3

    aggregate = PairRMJudge(path, mode="aggregate").preference_matrix(PROMPTS, COMPLETIONS)
    scores = (logits - logits.transpose(1, 2)).mean(-1)  # llm-blender's get_scores_from_cmps, max_logits
    assert torch.allclose(aggregate, torch.sigmoid(scores[:, :, None] - scores[:, None, :]), atol=1e-6)
    assert torch.allclose(judge.scores(PROMPTS, COMPLETIONS), scores, atol=1e-6)


def test_batch_size_does_not_change_results(checkpoints, judge):
    reference = judge.preference_matrix(PROMPTS, COMPLETIONS)
    for batch_size in (1, 24):
        other = PairRMJudge(checkpoints[("original", "safetensors")], batch_size=batch_size)
        assert torch.allclose(other.preference_matrix(PROMPTS, COMPLETIONS), reference, atol=1e-5)


def test_truncation_rules(checkpoints):
    judge = PairRMJudge(checkpoints[("hf", "safetensors")], max_source_length=24, max_candidate_length=10)
    tok = judge.tokenizer
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    full = tok("<|source|>" + long_text)["input_ids"]
    assert len(full) > 24

    # A long prompt fills its budget exactly (kept from the start, [SEP] last); candidates get no bonus.
    source, cands = judge.encode_prompt(long_text, [long_text, "short"])
    assert len(source) == 24 and source[:23] == full[:23] and source[-1] == tok.sep_token_id
    assert len(cands[0]) == 10 and cands[0][-1] == tok.sep_token_id
    assert cands[1] == tok("<|candidate|>short")["input_ids"]

    # A short prompt leaves budget: each candidate gets half of the unused source tokens on top of its own.
    source, cands = judge.encode_prompt("hello", [long_text])
    assert len(cands[0]) == 10 + (24 - len(source)) // 2

    # The sep token inside text is replaced by a space, as llm-blender does.
    source, _ = judge.encode_prompt("a [SEP] b", [])
    assert source.count(tok.sep_token_id) == 1

    # Long inputs run end to end with the default budgets too.
    default = PairRMJudge(checkpoints[("hf", "safetensors")])
    probs = default.preference_matrix([long_text * 4], [[long_text * 3, "short"]])
    assert torch.allclose(probs + probs.transpose(1, 2), torch.ones_like(probs), atol=1e-6)
    src, cands = default.encode_prompt(long_text * 4, [long_text * 3])
    assert len(src) == 1224 and len(cands[0]) == 412


def test_pairrm_argument_errors(checkpoints):
    path = checkpoints[("hf", "bin")]
    with pytest.raises(ValueError, match="mode"):
        PairRMJudge(path, mode="bubble")
    with pytest.raises(ValueError, match="batch_size"):
        PairRMJudge(path, batch_size=0)
    with pytest.raises(ValueError, match="No PairRM weights"):
        load_pairrm(str(checkpoints[("original", "bin")]) + "/backbone")  # a bare DeBERTa config dir


def test_non_pairrm_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a PairRM checkpoint"):
        load_pairrm(str(tmp_path))


def test_judge_input_errors(judge):
    with pytest.raises(ValueError, match="same number K"):
        judge.preference_matrix(["a", "b"], [["x", "y"], ["x"]])
    with pytest.raises(ValueError, match="same length"):
        judge.preference_matrix(["a"], [["x", "y"], ["x", "y"]])


def test_reward_function_judge_matches_the_callable():
    def reward(prompt, completion):
        return len(completion) - 0.1 * len(prompt)

    judge = RewardFunctionJudge(reward, temperature=2.0)
    prompts, completions = ["ab", "abcd"], [["x", "xxx", "xx"], ["yyyy", "y", "yy"]]
    probs = judge.preference_matrix(prompts, completions)
    for n, (p, cands) in enumerate(zip(prompts, completions)):
        for i, a in enumerate(cands):
            for j, b in enumerate(cands):
                expected = 1 / (1 + torch.exp(torch.tensor(-(reward(p, a) - reward(p, b)) / 2.0)))
                assert probs[n, i, j].item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.all(probs.diagonal(dim1=1, dim2=2) == 0.5)

    def pairwise(prompt, a, b):
        return 0.9 if len(a) > len(b) else 0.2

    probs = RewardFunctionJudge(pairwise, kind="pairwise").preference_matrix(prompts, completions)
    for n, cands in enumerate(completions):
        for i, a in enumerate(cands):
            for j, b in enumerate(cands):
                assert probs[n, i, j].item() == pytest.approx(0.5 if i == j else pairwise("", a, b))


def test_reward_function_judge_errors():
    with pytest.raises(ValueError, match="kind"):
        RewardFunctionJudge(len, kind="listwise")
    with pytest.raises(ValueError, match="temperature"):
        RewardFunctionJudge(len, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        RewardFunctionJudge(len, kind="pairwise", temperature=2.0)
    with pytest.raises(ValueError, match="probability"):
        RewardFunctionJudge(lambda p, a, b: 2.0, kind="pairwise").preference_matrix(["p"], [["a", "b"]])


# ---------------------------------------------------------------------------------------------------------------
# `preferences`: the uniform per-prompt records the runner stores
def test_pairrm_preference_records_in_both_modes(checkpoints, judge):
    logits = judge.pair_logits(PROMPTS, COMPLETIONS)
    scores = (logits - logits.transpose(1, 2)).mean(-1)
    pairwise = judge.preferences(PROMPTS, COMPLETIONS)
    matrices = judge.preference_matrix(PROMPTS, COMPLETIONS)
    for record, matrix, row in zip(pairwise, matrices, scores):
        assert set(record) == {"preferences", "win_probs", "chosen_index", "rejected_index", "scores"}
        assert torch.allclose(torch.tensor(record["preferences"], dtype=torch.float64), matrix.double(), atol=1e-6)
        wins = matrix.double().mean(-1)
        assert torch.allclose(torch.tensor(record["win_probs"], dtype=torch.float64), wins, atol=1e-6)
        own = record["win_probs"]
        assert (record["chosen_index"], record["rejected_index"]) == (own.index(max(own)), own.index(min(own)))
        assert torch.allclose(torch.tensor(record["scores"], dtype=torch.float64), row.double(), atol=1e-6)

    aggregate = PairRMJudge(checkpoints[("original", "safetensors")], mode="aggregate").preferences(
        PROMPTS, COMPLETIONS
    )
    for record, row in zip(aggregate, scores):
        expected = torch.sigmoid(row[:, None] - row[None, :]).double()
        assert torch.allclose(torch.tensor(record["preferences"], dtype=torch.float64), expected, atol=1e-6)
        # The pair is read off the record's own scores ("Paris." appears twice: a near-tie that batch padding noise
        # may break either way between two judges).
        own = record["scores"]
        assert (record["chosen_index"], record["rejected_index"]) == (own.index(max(own)), own.index(min(own)))


def test_reward_judge_modes_and_scores():
    rewards = {"4": 2.0, "5": 0.5, "9": -1.0}
    judge = RewardFunctionJudge(lambda prompt, c: rewards[c], temperature=2.0, mode="aggregate")
    assert judge.scores(["2+2="], [["4", "5", "9"]]).tolist() == [[1.0, 0.25, -0.5]]
    (record,) = judge.preferences(["2+2="], [["4", "5", "9"]])
    assert record["scores"] == [1.0, 0.25, -0.5]
    assert record["preferences"][0][1] == pytest.approx(torch.sigmoid(torch.tensor(0.75)).item())
    assert (record["chosen_index"], record["rejected_index"]) == (0, 2)

    pairwise = RewardFunctionJudge(lambda prompt, a, b: float(a < b), kind="pairwise")
    (record,) = pairwise.preferences(["p"], [["b", "a", "c"]])
    assert record["scores"] is None and (record["chosen_index"], record["rejected_index"]) == (1, 2)
    with pytest.raises(ValueError, match="only `kind='reward'` has"):
        RewardFunctionJudge(lambda prompt, a, b: 0.5, kind="pairwise", mode="aggregate")
    with pytest.raises(ValueError, match="mode"):
        RewardFunctionJudge(lambda prompt, c: 0.0, mode="bubble")
