"""The stages of one iteration, in the order they run: generate → (anchor samples) → judge → pairs → train (with
the reference pass) → evaluate → summary, card, push. Each takes the `Iteration` and stores its result on it;
each output file is written once, atomically, and reused when a rerun finds its stage done (its manifest:
`Iteration.stage_jsonl`, `trl_selfplay.runner.manifest`).
What a method changes is in its `MethodSpec` (`trl_selfplay.methods`), never here.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

from trl_selfplay.methods import PairInputs
from trl_selfplay.recipes import build_training_config, import_callable, iteration_dir, resolve_batch, start_model
from trl_selfplay.runner.context import Iteration, RunContext
from trl_selfplay.runner.data import TrainingFormat, examples
from trl_selfplay.runner.distributed import barrier, free_memory, is_main, num_processes, state
from trl_selfplay.runner.faults import training_callbacks
from trl_selfplay.runner.io import read_json, read_jsonl, write_json, write_text
from trl_selfplay.runner.manifest import OUTPUTS, Stage
from trl_selfplay.runner.training import train_and_save

# A seed range apart from the policy's (generation.seed + t), so μ's sampling noise is not π_t's.
ANCHOR_SEED_OFFSET = 1_000_003


# ----------------------------------------------------------------------------------------------------- generate


def _sample(it: Iteration, model_path: str, num_samples: int, seed: int) -> list[dict[str, Any]]:
    from trl_selfplay.generation import generate_completions

    g = it.recipe.generation
    kwargs = it.model_kwargs(model_path)
    backend_kwargs = dict(g.backend_kwargs)
    if g.backend == "vllm":
        model: Any = model_path
        backend_kwargs.setdefault("trust_remote_code", kwargs["trust_remote_code"])
        if "revision" in kwargs:
            backend_kwargs.setdefault("revision", kwargs["revision"])
    else:
        from trl_selfplay.models import load_causal_lm

        model = load_causal_lm(model_path, **kwargs, device=state().device)
    output = generate_completions(
        model,
        [e["prompt"] for e in it.examples],
        tokenizer=it.run.load_tokenizer(model_path),
        backend=g.backend,
        num_samples=num_samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        seed=seed,
        prompt_template=g.prompt_template,
        add_special_tokens=g.add_special_tokens,
        batch_size=g.batch_size,
        accelerator=state(),
        **backend_kwargs,
    )
    del model
    free_memory()  # generation memory is released before the judge and the trainer load their models
    return [
        {"prompt": e["prompt"], "response": e["response"], "completions": c, "num_tokens": n}
        for e, c, n in zip(it.examples, output.completions, output.num_tokens, strict=True)
    ]


def generate(it: Iteration) -> None:
    """`generations.jsonl`: K completions per prompt sampled from π_t with seed `generation.seed + t`."""
    g = it.recipe.generation

    def compute() -> list[dict[str, Any]]:
        it.log(f"generations: {g.num_samples} completion(s) for {len(it.examples)} prompts from {it.policy}")
        return _sample(it, it.policy, g.num_samples, g.seed + it.t)

    it.generations = it.stage_jsonl("generate", compute)


def anchor_samples(it: Iteration, config: Any) -> None:
    """`anchor_generations.jsonl` when the config trains on samples from μ (RSPO's `forward_kl`): when π_t is μ,
    sample 0 of π_t's K samples is one; otherwise μ samples once more, with its own seed."""
    if not getattr(config, "needs_anchor_samples", False):
        return
    if it.anchor == it.policy:
        it.anchor_samples = [g["completions"][0] for g in it.generations]
        return

    def compute() -> list[dict[str, Any]]:
        it.log(f"anchor_generations: 1 completion for {len(it.examples)} prompts from {it.anchor}")
        return _sample(it, it.anchor, 1, it.recipe.generation.seed + ANCHOR_SEED_OFFSET + it.t)

    rows = it.stage_jsonl("anchor_generations", compute)
    it.anchor_samples = [row["completions"][0] for row in rows]


# -------------------------------------------------------------------------------------------------------- judge


def judge_prompts(it: Iteration, prompts: list[str]) -> list[str]:
    """The prompt text the judge reads (`judge.prompt_format`): the policy's chat-template rendering of the user
    turn, as uclaml/SPPO's `scripts/rank.py` passes it, or the raw prompt."""
    if it.recipe.judge.prompt_format == "raw":
        return prompts
    from trl_selfplay.generation.prompts import judge_source_text

    tokenizer = it.run.load_tokenizer(it.policy)
    template = it.recipe.generation.prompt_template
    return [judge_source_text(tokenizer, p, template) for p in prompts]


def judge(it: Iteration) -> None:
    """`preferences.jsonl`: per prompt the K×K preferences, win probabilities and the chosen / rejected indices
    (`judge.mode`), judged on shards of the prompts across processes."""

    def compute() -> list[dict[str, Any]]:
        from accelerate.utils import gather_object

        it.log(f"judging {len(it.generations)} prompts × {it.recipe.generation.num_samples} samples")
        judge = it.run.judge(it.recipe)
        prompts = judge_prompts(it, [g["prompt"] for g in it.generations])
        s = state()
        with s.split_between_processes(list(range(len(it.generations)))) as shard:
            shard = list(shard)
            rows = judge.preferences([prompts[i] for i in shard], [it.generations[i]["completions"] for i in shard])
            local = list(zip(shard, rows, strict=True))
        gathered = dict(gather_object(local) if s.num_processes > 1 else local)
        del judge
        free_memory()
        return [gathered[i] for i in range(len(it.generations))]

    it.preferences = it.stage_jsonl("judge", compute)


# -------------------------------------------------------------------------------------------------------- pairs


def skip_ties(rows: list[dict[str, Any]], num_current: int) -> tuple[list[dict[str, Any]], int, int]:
    """Drop the pairs whose chosen and rejected texts are equal (all K samples of the prompt alike): they carry no
    preference. Returns the kept rows, how many of them are current, and how many were skipped."""
    kept = [(i, row) for i, row in enumerate(rows) if row["chosen"] != row["rejected"]]
    first_current = len(rows) - num_current
    kept_current = sum(1 for i, _ in kept if i >= first_current)
    return [row for _, row in kept], kept_current, len(rows) - len(kept)


def pairs(it: Iteration) -> None:
    """`train.jsonl`: the method's training rows (`MethodSpec.build_rows`), this iteration's own rows last.
    Methods that pair two samples of a prompt (`MethodSpec.distinct_samples`) skip the prompts whose chosen and
    rejected samples tie, with a logged count."""
    r = it.recipe
    mix = r.data.mix_previous_iterations
    mix = (it.spec.default_mix_previous_iterations or 0) if mix is None else mix
    previous = [
        read_jsonl(iteration_dir(r.output_dir, s) / "generations.jsonl") for s in range(max(0, it.t - mix), it.t)
    ]
    inputs = PairInputs(
        examples=it.examples,
        fmt=TrainingFormat.from_recipe(r),
        generations=it.generations,
        previous=previous,
        preferences=it.preferences,
        anchor_samples=it.anchor_samples,
    )
    rows, it.num_current_rows = it.spec.build_rows(inputs)  # pure and cheap: rebuilt on resume for the count
    if it.spec.distinct_samples:
        rows, it.num_current_rows, it.num_tied_pairs = skip_ties(rows, it.num_current_rows)
        if it.num_tied_pairs:
            it.log(
                f"{it.num_tied_pairs} of {len(rows) + it.num_tied_pairs} prompts have identical chosen and rejected "
                "samples (their K samples tie): skipped from training. Many ties mean the samples barely differ: "
                "raise `generation.temperature` or `generation.num_samples`."
            )
    it.rows = it.stage_jsonl("pairs", lambda: rows)


# -------------------------------------------------------------------------------------------------------- train


def training_config(it: Iteration):
    """The method's TRL config of this iteration (in `<iter>/trainer`), with the defaults known only at run time;
    built once per iteration (the anchor-sample stage and training both read it)."""
    if it.config is None:
        r = it.recipe
        defaults = {"model_init_kwargs": it.model_kwargs(it.policy)}
        method_defaults = it.spec.trainer_defaults(it) if it.spec.trainer_defaults is not None else {}
        if not set(method_defaults) & set(r.training):
            defaults.update(method_defaults)
        it.config = build_training_config(
            r.method, resolve_batch(r, r.training, num_processes()), str(it.dir / "trainer"), defaults=defaults
        )
    return it.config


def reference(it: Iteration, trainer) -> dict[str, Any] | None:
    """`reference.json`: π_t's log-probs of every pair (the trainer's precompute pass) and the scored lengths;
    the method's `before_train` hook adds its entries (IRIS: D̂_t and α_t)."""
    data = trainer.train_dataset
    if "ref_chosen_logps" not in data.column_names:
        return None
    # The values are keyed by `train.jsonl` row: the trainer drops the rows whose prompt alone fills `max_length`
    # (listed in `trainer.dropped_rows`, indices as given), so position i here is row `rows[i]` of train.jsonl.
    dropped = sorted(getattr(trainer, "dropped_rows", {}).get("train", []))
    gone = set(dropped)
    kept = [i for i in range(len(it.rows)) if i not in gone]
    if len(kept) != len(data):
        raise RuntimeError(
            f"the trainer's dataset has {len(data)} rows, but train.jsonl has {len(it.rows)} with {len(dropped)} "
            "dropped: the reference values cannot be matched to their pairs."
        )
    if dropped:
        it.log(
            f"the trainer dropped {len(dropped)} of {len(it.rows)} pairs whose prompt alone fills "
            f"`training.max_length` (train.jsonl rows {dropped[:10]}{' ...' if len(dropped) > 10 else ''}); set "
            "`training.max_prompt_length` to cut long prompts instead, or raise `training.max_length`."
        )
    first_current = len(it.rows) - it.num_current_rows
    chosen_lengths, rejected_lengths = trainer.completion_lengths()  # after the trainer's truncation
    record: dict[str, Any] = {
        "reference_model": it.policy,
        "rows": kept,
        "dropped_rows": dropped,
        "ref_chosen_logps": list(data["ref_chosen_logps"]),
        "ref_rejected_logps": list(data["ref_rejected_logps"]),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        # Positions (in the lists above) of this iteration's own pairs.
        "current_rows": [sum(1 for i in kept if i < first_current), len(kept)],
    }
    if it.spec.before_train is not None:
        extras = it.spec.before_train(it, trainer, record)
        record.update(extras, method_metrics=sorted(extras))
    if is_main():
        write_json(it.dir / "reference.json", record)
    barrier()
    return record


def train(it: Iteration) -> None:
    """`model/` = π_{t+1}, trained from π_t (with `reference.json` written after the trainer's reference pass)
    and `train_metrics.json`."""
    stage = it.stage("train")
    if stage.done():
        it.log("training done, skipping")
        return
    config = training_config(it)
    it.log(f"training {it.recipe.method} on {len(it.rows)} pairs from {it.policy}")
    train_and_save(
        it.run, it.spec.trainer_class(), it.policy, config, it.rows, it.dir / "model", stage,
        callbacks=training_callbacks(it.run.output_dir, it.t), before_train=lambda t: reference(it, t),
    )  # fmt: skip


def warm_start(run: RunContext) -> None:
    """The optional SFT warm start before iteration 0 (`sft` section): `<output_dir>/sft/model`."""
    from trl_selfplay.methods import get_method

    r = run.recipe
    final = Path(start_model(r, 0))
    stage = run.stage("sft")
    if stage.done():
        run.log("sft warm start: done, skipping")
        return
    run.log("sft warm start: training")
    fmt = TrainingFormat.from_recipe(r)
    rows = [fmt.sft(e["prompt"], e["response"]) for e in examples(run.dataset(r), r, r.sft.num_examples)]
    training = resolve_batch(r, r.sft.training, num_processes())
    config = build_training_config(
        "sft", training, str(final.parent / "trainer"), defaults={"model_init_kwargs": run.model_kwargs(r.model.name_or_path)},
        prefix="sft.training",
    )  # fmt: skip
    train_and_save(run, get_method("sft").trainer_class(), r.model.name_or_path, config, rows, final, stage)


# --------------------------------------------------------------------------------------------------- evaluation


def call_evaluation(run: RunContext, recipe, **call: Any) -> dict[str, Any]:
    """The recipe's evaluation hook with the arguments its signature takes (all of them with `**kwargs`)."""
    fn = import_callable(recipe.evaluation.function, "evaluation.function")
    params = inspect.signature(fn).parameters
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call = {k: v for k, v in call.items() if accepts_all or k in params}
    inputs = {
        "prompt_template": recipe.generation.prompt_template,
        "judge": run.judge(recipe) if recipe.judge is not None else None,
        "generation": dataclasses.asdict(recipe.generation),
        "seed": recipe.generation.seed,
    }
    inputs = {k: v for k, v in inputs.items() if accepts_all or k in params}
    return dict(fn(**call, **inputs, **recipe.evaluation.kwargs) or {})


def evaluate_model(run: RunContext, recipe, stage: Stage, **call: Any) -> dict[str, Any]:
    """Run the evaluation hook once (main process) into the stage's output; reuse it when the stage is done."""
    (name,) = OUTPUTS[stage.name]
    path = stage.dir / name
    if not stage.done():
        if is_main():
            write_json(path, call_evaluation(run, recipe, **call))
            stage.commit()
        barrier()
        free_memory()
    return read_json(path)


def evaluate(it: Iteration) -> None:
    """`eval.json`: the recipe's evaluation hook on π_{t+1} (with π_t as the previous model)."""
    if it.recipe.evaluation is None:
        return
    stage = it.stage("evaluate")
    if not stage.done():
        it.log("evaluating")
    it.eval_metrics = evaluate_model(
        it.run, it.recipe, stage, model_name_or_path=str(it.dir / "model"),
        previous_model_name_or_path=it.policy, iteration=it.t, output_dir=str(it.dir),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ summary, card, push


def summarise(it: Iteration) -> dict[str, Any]:
    """The iteration's summary line: the last logged training values, the evaluation, the method's extras."""
    history = read_json(it.dir / "train_metrics.json")
    last_logged: dict[str, Any] = {}
    for entry in history["log_history"]:
        if "loss" in entry:
            last_logged = entry
    train_metrics = {**{k: v for k, v in last_logged.items() if isinstance(v, int | float)}, **history["train"]}
    reference_path = it.dir / "reference.json"
    dropped = 0
    if reference_path.exists():  # the method's before-train values (IRIS: gap, alpha), logged as `<method>/<key>`
        ref = read_json(reference_path)
        train_metrics.update({f"{it.spec.name}/{key}": ref[key] for key in ref.get("method_metrics", [])})
        dropped = len(ref.get("dropped_rows", []))
    return {
        "iteration": it.t,
        "num_completed_iterations": it.t + 1,
        "method": it.recipe.method,
        "model": str(it.dir / "model"),
        "start_model": it.policy,
        "num_pairs": len(it.rows),
        "num_current_pairs": it.num_current_rows,
        "num_tied_pairs": it.num_tied_pairs,  # skipped: chosen == rejected (MethodSpec.distinct_samples)
        "num_dropped_pairs": dropped,  # dropped by the trainer: prompt alone fills max_length
        "train": train_metrics,
        "eval": it.eval_metrics or {},
    }


def card(it: Iteration, metrics: dict[str, Any]) -> None:
    """`model/README.md`: the checkpoint's model card."""
    from trl_selfplay.hub import model_card

    if is_main():
        write_text(it.dir / "model" / "README.md", model_card(it.recipe, it.t, it.policy, metrics))
    barrier()


def push(it: Iteration) -> None:
    """`push.json`: iteration t uploaded to `<hub.model_id>-iter<t>` (once; a rerun with push on pushes what is
    missing)."""
    from trl_selfplay.hub import push_iteration, repo_id_for

    r = it.recipe
    path = it.dir / "push.json"
    if not r.hub.push or path.exists():
        return
    if is_main():
        info = push_iteration(
            it.dir / "model", repo_id_for(r.hub.model_id, it.t), private=r.hub.private, api=it.run.hub_api
        )
        write_json(path, info)
    barrier()
