"""Model cards and Hub pushes of per-iteration checkpoints.

Each iteration t is pushed to its OWN repository `<hub.model_id>-iter<t>` (not a revision of one repository): every
checkpoint then has its own model card, download counter and `from_pretrained("<id>-iter<t>")` id, which is how the
SPIN, SPPO and RSPO authors published theirs (e.g. `UCLA-AGI/zephyr-7b-sft-full-SPIN-iter0`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trl_selfplay.methods import get_method


def repo_id_for(model_id: str, iteration: int) -> str:
    """Repository of iteration t: `<model_id>-iter<t>`."""
    return f"{model_id}-iter{iteration}"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def model_card(recipe, iteration: int, start_model: str, metrics: dict[str, Any] | None = None) -> str:
    """Markdown model card of iteration `iteration`'s checkpoint: method, iteration, start model, data,
    hyperparameters and metrics."""
    spec = get_method(recipe.method)
    name, paper = spec.paper, spec.citation
    data = recipe.data
    dataset = data.dataset_name or data.dataset_fn
    front = ["---", "library_name: transformers", "tags:", "- trl", "- trl-selfplay", f"- {recipe.method}"]
    base = start_model if _is_hub_id(start_model) else recipe.model.name_or_path
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    if _is_hub_id(data.dataset_name):
        front += ["datasets:", f"- {data.dataset_name}"]
    front.append("---")

    lines = [
        *front,
        "",
        f"# {name} iteration {iteration}",
        "",
        f"This checkpoint is the model after iteration {iteration} of {name} self-play fine-tuning ({paper}), "
        f"trained with `trl_selfplay` (self-play trainers on top of Hugging Face TRL).",
        "",
        f"- **Method:** `{recipe.method}`",
        f"- **Iteration:** {iteration} of {recipe.iterations.count} (0-based)",
        f"- **Start model (π_{iteration}, also the reference of this iteration):** `{start_model}`",
        f"- **Initial model:** `{recipe.model.name_or_path}`"
        + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""),
        f"- **Data:** `{dataset}` split `{data.split}`, prompt column `{data.prompt_column}`"
        + (f", annotated response column `{data.response_column}`" if data.response_column else "")
        + (f", {data.num_prompts} prompts (seed {data.seed})" if data.num_prompts else f" (seed {data.seed})")
        + (f", fold {iteration % data.num_folds} of {data.num_folds}" if data.num_folds > 1 else ""),
    ]
    if spec.generates:
        g = recipe.generation
        template = "the tokenizer's chat template" if g.prompt_template is None else f"`{g.prompt_template!r}`"
        lines.append(
            f"- **Generation:** {g.num_samples} sample(s) per prompt, temperature {g.temperature}, top-p {g.top_p}, "
            f"max {g.max_new_tokens} new tokens, prompt format {template}"
        )
        if recipe.data.train_prompt_format == "chat_template":
            system = recipe.data.system_message
            lines.append(
                "- **Training format:** the tokenizer's chat template"
                + ("" if system is None else f" with system message {system!r}")
            )
        else:
            lines.append("- **Training format:** the prompt as generation formatted it")
    if spec.needs_judge and recipe.judge is not None:
        judge = recipe.judge.model_name_or_path if recipe.judge.type == "pairrm" else recipe.judge.function
        lines.append(
            f"- **Judge:** {recipe.judge.type} `{judge}`, preferences `{recipe.judge.mode}`, prompt as "
            f"`{recipe.judge.prompt_format}`"
        )
    lines += ["", "## Hyperparameters", "", "| field | value |", "|---|---|"]
    for key, value in sorted(recipe.training.items()):
        lines.append(f"| `{key}` | {_fmt(value)} |")
    if recipe.global_batch_size:
        lines.append(f"| global batch size | {recipe.global_batch_size} |")
    metrics = metrics or {}
    if "num_pairs" in metrics:
        current = metrics.get("num_current_pairs", metrics["num_pairs"])
        earlier = metrics["num_pairs"] - current
        lines.insert(
            lines.index("## Hyperparameters") - 1,
            f"- **Training rows:** {metrics['num_pairs']}"
            + (f" ({current} from this iteration's samples, {earlier} from earlier iterations)" if earlier else ""),
        )
    for section in ("train", "eval"):
        values = {k: v for k, v in (metrics.get(section) or {}).items() if isinstance(v, int | float)}
        if values:
            lines += ["", f"## {'Training' if section == 'train' else 'Evaluation'} metrics", "", "| metric | value |"]
            lines.append("|---|---|")
            lines += [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(values.items())]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"accelerate launch scripts/run.py {recipe.source}",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_iteration(model_dir: str | Path, repo_id: str, *, private: bool = False, api: Any = None) -> dict[str, Any]:
    """Create `repo_id` if needed and upload the checkpoint folder (weights, tokenizer, README.md model card).

    `api` defaults to `huggingface_hub.HfApi()` (token from the usual login); tests inject a stand-in.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(model_dir),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"Upload {Path(model_dir).parent.name} checkpoint (trl_selfplay)",
    )
    return {"repo_id": repo_id, "private": private, "commit_url": str(getattr(info, "commit_url", info))}
