"""Model cards and Hub pushes.

The tests cannot reach the Hugging Face Hub, so the upload goes through a STAND-IN for `huggingface_hub.HfApi`
(`RecordingApi` below) injected into `push_iteration` / the loop; it records the calls the real client would get.
Everything else (card text, files, resume marker) is real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_selfplay.hub import model_card, push_iteration, repo_id_for
from trl_selfplay.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


class RecordingApi:
    """Stand-in for `huggingface_hub.HfApi` (no network here): records `create_repo` and `upload_folder` calls."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        # The real client uploads the folder's files: check they are there at upload time.
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

        return Info()


def test_repo_id_per_iteration():
    assert repo_id_for("org/zephyr-spin", 0) == "org/zephyr-spin-iter0"
    assert repo_id_for("org/zephyr-spin", 3) == "org/zephyr-spin-iter3"


def test_model_card_names_method_iteration_start_model_data_hyperparameters_metrics():
    recipe = load_recipe(ROOT / "recipes/spin/zephyr-7b-sft-full.yaml").for_iteration(3)
    metrics = {
        "train": {"rewards/margins": 1.25, "loss": 0.31},
        "eval": {"accuracy": 0.625},
        "num_pairs": 100000,
        "num_current_pairs": 50000,
    }
    card = model_card(recipe, 3, "runs/spin-zephyr-7b-sft-full/iter_2/model", metrics)
    assert card.startswith("---\n") and "base_model: alignment-handbook/zephyr-7b-sft-full" in card
    assert "- spin" in card and "- UCLA-AGI/SPIN_iter0" in card
    assert "# SPIN iteration 3" in card and "arXiv:2401.01335" in card
    assert "**Iteration:** 3 of 4" in card
    assert "`runs/spin-zephyr-7b-sft-full/iter_2/model`" in card  # start model π_3
    assert "split `train`" in card and "revision `ac6e600eefcce74f5e8bae1035d4f66019e93190`" in card
    # The real number of training rows: iteration 3 trains on its own pairs plus iteration 2's (issue 12.11).
    assert "**Training rows:** 100000 (50000 from this iteration's samples, 50000 from earlier iterations)" in card
    assert "**Training format:** the tokenizer's chat template with system message ''" in card
    assert "| `beta` | 5 |" in card and "| `learning_rate` | 1e-07 |" in card  # iteration 3's resolved values
    assert "| global batch size | 64 |" in card
    assert "### Instruction: {prompt}" in card  # the prompt format is visible
    assert "| `rewards/margins` | 1.25 |" in card and "| `accuracy` | 0.625 |" in card


def test_model_card_rspo_names_judge_and_dataset():
    recipe = load_recipe(ROOT / "recipes/rspo/mistral-7b-instruct-v0.2.yaml").for_iteration(1)
    card = model_card(recipe, 1, "runs/rspo-mistral-7b/iter_0/model", {})
    assert "# RSPO iteration 1" in card and "`UCLA-AGI/data-mistral-7b-instruct-sppo-iter2`" in card
    assert "**Judge:** pairrm `llm-blender/PairRM`, preferences `aggregate`, prompt as `chat_template`" in card
    assert '| `regularizers` | {"reverse_kl": 0.5, "forward_kl_is": 0.1} |' in card


def test_push_iteration_makes_the_right_calls(tmp_path):
    folder = tmp_path / "iter_2" / "model"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("card")
    api = RecordingApi()
    info = push_iteration(folder, "org/run-iter2", private=True, api=api)
    assert api.calls[0] == (
        "create_repo",
        {"repo_id": "org/run-iter2", "repo_type": "model", "private": True, "exist_ok": True},
    )
    name, kwargs = api.calls[1]
    assert name == "upload_folder" and kwargs["repo_id"] == "org/run-iter2" and kwargs["repo_type"] == "model"
    assert kwargs["folder_path"] == str(folder) and kwargs["files"] == ["README.md", "model.safetensors"]
    assert info["commit_url"].endswith("/commit/abc123")


def test_loop_push_stage_pushes_once(tmp_path):
    """The loop's push stage: iteration t goes to `<model_id>-iter<t>`, recorded in push.json, never pushed twice."""
    from trl_selfplay.runner import stages
    from trl_selfplay.runner.context import Iteration, RunContext

    recipe = load_recipe(
        ROOT / "recipes/tiny/spin.yaml",
        [f"--output_dir={tmp_path}", "--hub.push=true", "--hub.model_id=org/tiny-spin", "--hub.private=true"],
    )
    out = tmp_path / "iter_1"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    api = RecordingApi()
    iteration = Iteration(RunContext(recipe, hub_api=api), 1)
    stages.push(iteration)
    stages.push(iteration)  # a resumed run: already pushed
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][1]["repo_id"] == "org/tiny-spin-iter1"
    assert json.loads((out / "push.json").read_text())["repo_id"] == "org/tiny-spin-iter1"


def test_push_without_client_uses_huggingface_hub(tmp_path, monkeypatch):
    """Without an injected client, `HfApi()` is used (replaced here by the stand-in: no network)."""
    import huggingface_hub

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    (tmp_path / "model").mkdir()
    push_iteration(tmp_path / "model", "org/x-iter0")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


@pytest.mark.parametrize("method", ["spin", "iris", "rspo", "sft"])
def test_model_card_for_every_method(method):
    from trl_selfplay.methods import get_method

    recipe = load_recipe(ROOT / f"recipes/tiny/{method}.yaml").for_iteration(0)
    card = model_card(recipe, 0, "runs/tiny-model", {"train": {"loss": 0.5}})
    assert f"# {get_method(method).paper} iteration 0" in card and "| `loss` | 0.5 |" in card
    assert ("**Generation:**" in card) == (method != "sft")
