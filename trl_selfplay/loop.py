"""The multi-iteration self-play runner: one recipe (see `trl_selfplay.recipes`) in, one checkpoint per iteration out.

Per iteration t, each stage in `<output_dir>/iter_<t>/`:

    generations.jsonl   prompts of iteration t (RSPO: fold t) and K completions sampled from π_t
    anchor_generations.jsonl
                        RSPO with the `forward_kl` regularizer, when π_t ≠ μ: one completion per prompt sampled
                        from the anchor μ (when π_t = μ, sample 0 of generations.jsonl is μ's sample)
    preferences.jsonl   RSPO: the K×K preference matrix per prompt, win probabilities, chosen / rejected indices
    train.jsonl         the TRL preference dataset (SPIN: plus the previous iterations' pairs)
    reference.json      π_t's log-probs of every pair, computed once before training (IRIS: D̂_t and α_t)
    model/              π_{t+1}, trained from π_t, with its tokenizer and (after evaluation) a model card
    train_metrics.json  the trainer's log history
    eval.json           the evaluation hook's metrics (when the recipe has an `evaluation` section)
    metrics.json        the iteration's summary line, also collected in `<output_dir>/metrics.jsonl`
    push.json           where the checkpoint was pushed (when `hub.push`)

Every file is written to a temporary name and renamed, so a file that exists is complete; a stage whose output
exists is skipped. Rerunning the same command after a crash therefore resumes at the first unfinished stage and
never regenerates or overwrites finished work. Under `accelerate launch` with several processes, generation and
judging are sharded across processes, training is distributed, and only the main process writes shared files.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trl_selfplay.recipes import (
    Recipe,
    RecipeError,
    anchor_model,
    build_training_config,
    import_callable,
    iteration_dir,
    loop_training_defaults,
    needs_anchor_samples,
    resolve_batch,
    start_model,
)

logger = logging.getLogger("trl_selfplay.loop")

# Test hook: "<stage>@<iteration>" (stage: generate, judge, train; "train@<t>:<k>" for after optimizer step k,
# default 1) makes that stage stop at a known point, write `<output_dir>/.paused-<stage>-<t>` and sleep, so a test
# can kill the run there deterministically. Generation and judging stop half-way through writing their file.
PAUSE_ENV = "TRL_SELFPLAY_PAUSE_AT"


# ------------------------------------------------------------------------------------------------ utilities


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def setup_distributed() -> None:
    """Several processes on a machine without GPU (`accelerate launch --multi_gpu --num_processes N` on CPU): make
    accelerate and the Trainer's arguments both pick the gloo CPU backend instead of silently running N copies."""
    if _multi_process_cpu():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def shutdown_distributed() -> None:
    """Wait for every process, then tear the process group down explicitly: left to interpreter exit, the gloo /
    DeepSpeed CPU threads can abort one process after all the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _barrier()
        dist.destroy_process_group()


def _multi_process_cpu() -> bool:
    # DeepSpeed must keep its own launch: `use_cpu` would disable it (the trainers pick gloo for it themselves).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and _cpu_only() and not deepspeed


def _state():
    from accelerate import PartialState

    return PartialState(cpu=_multi_process_cpu())


def _barrier() -> None:
    _state().wait_for_everyone()


def _is_main() -> bool:
    return _state().is_main_process


def _pause_step(stage: str, t: int) -> int | None:
    """The step at which the test hook pauses `stage` of iteration t, or None."""
    target = os.environ.get(PAUSE_ENV, "")
    where, _, step = target.partition(":")
    return int(step or 1) if where == f"{stage}@{t}" else None


def _maybe_pause(recipe: Recipe, stage: str, t: int) -> None:
    if _pause_step(stage, t) is None:
        return
    marker = Path(recipe.output_dir) / f".paused-{stage}-{t}"
    if _is_main():
        marker.write_text(str(os.getpid()))
    while True:  # killed by the test
        time.sleep(0.2)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _atomic_write_jsonl(path: Path, rows: list[dict[str, Any]], pause: tuple[Recipe, str, int] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for i, row in enumerate(rows):
            if pause is not None and i == len(rows) // 2:
                f.flush()
                _maybe_pause(*pause)  # a crash half-way through the write leaves only the .tmp file
            f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------------------------ data


def _load_dataset(recipe: Recipe, load_remote: bool = True):
    """The recipe's dataset split, or None when it is remote and `load_remote` is False (dry-run)."""
    import datasets

    d = recipe.data
    if d.dataset_fn is not None:
        fn = import_callable(d.dataset_fn, "data.dataset_fn")
        params = inspect.signature(fn).parameters
        return fn(split=d.split) if "split" in params else fn()
    path = Path(d.dataset_name)
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            return loaded[d.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
            if builder is None:
                raise RecipeError(f"`data.dataset_name`: cannot read {path} (use .jsonl, .json, .csv or .parquet).")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(str(path), d.dataset_config, data_files=d.data_files, split=d.split)
    if not load_remote:
        return None
    return datasets.load_dataset(
        d.dataset_name, d.dataset_config, data_files=d.data_files, split=d.split, revision=d.revision
    )


def _needed_columns(recipe: Recipe) -> dict[str, str]:
    needed = {"data.prompt_column": recipe.data.prompt_column}
    if recipe.data.response_column and (recipe.method in ("spin", "iris", "sft") or recipe.sft is not None):
        needed["data.response_column"] = recipe.data.response_column
    return needed


def check_data(recipe: Recipe, load_remote: bool = True):
    """Load the dataset (remote ones only if `load_remote`) and check it has the columns the method needs."""
    try:
        dataset = _load_dataset(recipe, load_remote=load_remote)
    except RecipeError:
        raise
    except Exception as error:
        raise RecipeError(f"{recipe.source}: cannot load the dataset of `data`: {error}") from error
    if dataset is None:
        return None
    for field_name, column in _needed_columns(recipe).items():
        if column not in dataset.column_names:
            raise RecipeError(
                f"{recipe.source}: `{field_name}` is {column!r}, but the dataset has no such column (columns: "
                f"{dataset.column_names}). Set `{field_name}` to the column holding the "
                f"{'prompt' if field_name.endswith('prompt_column') else 'annotated response'}."
            )
    return dataset


def _message_text(value: Any, role: str, column: str) -> str:
    """A prompt / response column holds a string, or a conversation whose first `role` turn is the text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in value:
            if isinstance(message, dict) and message.get("role") == role:
                return message["content"]
    what = "a prompt" if role == "user" else "an annotated response"
    raise RecipeError(f"`data.{column}`: cannot read {what} from {str(value)[:80]!r}.")


def _examples(dataset, recipe: Recipe, limit: int | None) -> list[dict[str, str]]:
    """Seeded shuffle, then the first `limit` rows as {"prompt", "response"} (response None without a column)."""
    d = recipe.data
    dataset = dataset.shuffle(seed=d.seed)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    columns = [d.prompt_column] + ([d.response_column] if d.response_column in dataset.column_names else [])
    rows = dataset.select_columns(columns).to_list()
    out = []
    for row in rows:
        response = (
            _message_text(row[d.response_column], "assistant", "response_column") if d.response_column in row else None
        )
        out.append({"prompt": _message_text(row[d.prompt_column], "user", "prompt_column"), "response": response})
    return out


def iteration_examples(dataset, recipe: Recipe, t: int) -> list[dict[str, str]]:
    """The prompts of iteration t: the same `num_prompts` every iteration, or fold t of them (RSPO `num_folds`)."""
    examples = _examples(dataset, recipe, recipe.data.num_prompts)
    folds = recipe.data.num_folds
    if folds > 1:
        size = len(examples) // folds
        fold = t % folds
        examples = examples[fold * size : (fold + 1) * size]
    return examples


def _format_response(response: str, template: str | None) -> str | list[dict[str, str]]:
    """A response in TRL's format: plain text with a fixed template, else one assistant message."""
    return response if template is not None else [{"role": "assistant", "content": response}]


def _format_prompt(prompt: str, template: str | None) -> str | list[dict[str, str]]:
    return template.replace("{prompt}", prompt) if template is not None else [{"role": "user", "content": prompt}]


def _pair(prompt: str, chosen: str, rejected: str, template: str | None) -> dict[str, Any]:
    """TRL's preference format. A fixed template gives a plain-text prompt (the same string generation used);
    otherwise the conversational format, which TRL renders with the same chat template generation used."""
    return {
        "prompt": _format_prompt(prompt, template),
        "chosen": _format_response(chosen, template),
        "rejected": _format_response(rejected, template),
    }


def _sft_example(prompt: str, response: str, template: str | None) -> dict[str, Any]:
    return {"prompt": _format_prompt(prompt, template), "completion": _format_response(response, template)}


# ------------------------------------------------------------------------------------------------- models


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _model_kwargs(recipe: Recipe, path: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(recipe.model.dtype),
        "trust_remote_code": recipe.model.trust_remote_code,
    }
    if path == recipe.model.name_or_path and recipe.model.revision is not None:
        kwargs["revision"] = recipe.model.revision
    return kwargs


def _load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    kwargs = _model_kwargs(recipe, path)
    kwargs.pop("dtype")
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _build_start_model(recipe: Recipe) -> None:
    """`model.build_fn`: build the start model (e.g. a tiny model trained from scratch) when its path is missing."""
    if recipe.model.build_fn is None or Path(recipe.model.name_or_path).exists():
        return
    if _is_main():
        fn = import_callable(recipe.model.build_fn, "model.build_fn")
        tmp = recipe.model.name_or_path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fn(tmp)
        os.replace(tmp, recipe.model.name_or_path)
    _barrier()


class _PauseCallback:
    """Trainer callback of the test hook: pause after optimizer step `step` of iteration t (before that step's
    checkpoint, if any, is saved)."""

    def __init__(self, recipe: Recipe, t: int, step: int):
        self.recipe, self.t, self.step = recipe, t, step

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            _maybe_pause(self.recipe, "train", self.t)


def _trainer_class(method: str):
    if method == "spin":
        from trl_selfplay.trainers.spin import SPINTrainer as cls
    elif method == "iris":
        from trl_selfplay.trainers.iris import IRISTrainer as cls
    elif method == "rspo":
        from trl_selfplay.trainers.rspo import RSPOTrainer as cls
    else:
        from trl import SFTTrainer as cls
    return cls


def _save_model(trainer, tokenizer, final_dir: Path) -> None:
    """Save through the trainer (ZeRO-3 gathers the shards on every process) to a temp dir, then rename."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    trainer.save_model(str(tmp))
    if _is_main():
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, final_dir)
    _barrier()


# ------------------------------------------------------------------------------------------------ the loop


class SelfPlayLoop:
    """Runs a validated recipe, resuming from whatever `output_dir` already holds."""

    def __init__(self, recipe: Recipe, hub_api: Any = None):
        self.recipe = recipe
        self.output_dir = Path(recipe.output_dir)
        self.hub_api = hub_api
        self.dataset = None

    # -- helpers
    def _log(self, message: str) -> None:
        if _is_main():
            print(f"[trl-selfplay] {message}", flush=True)

    def _judge(self, recipe: Recipe):
        j = recipe.judge
        if j is None:
            return None
        if j.type == "function":
            from trl_selfplay.judges import RewardFunctionJudge

            fn = import_callable(j.function, "judge.function")
            return RewardFunctionJudge(fn, kind=j.kind, temperature=j.temperature, **j.kwargs)
        from trl_selfplay.judges import PairRMJudge

        return PairRMJudge(j.model_name_or_path, batch_size=j.batch_size, **j.kwargs)

    # -- entry point
    def run(self) -> None:
        r = self.recipe
        setup_distributed()
        # Everything that can be checked without a model is checked first: the dataset and its columns, and the
        # optional packages the recipe needs.
        self._check_backends()
        with _state().main_process_first():  # one download of a Hub dataset, then read from the cache
            self.dataset = check_data(r)
        if _is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._record_recipe()
        _barrier()
        _build_start_model(r)
        if r.sft is not None:
            self._sft_warm_start()
        if r.evaluation is not None:
            self._evaluate_initial()
        for t in range(r.iterations.count):
            self._iteration(t)
        self._log(f"done: {r.iterations.count} iterations in {self.output_dir}")
        if _is_main():
            self._report()

    def _report(self) -> None:
        """The per-iteration summary table, and the run's plot next to its metrics.jsonl."""
        import importlib.util

        from trl_selfplay.evaluation import format_summary_table, read_metrics

        metrics, png = self.output_dir / "metrics.jsonl", self.output_dir / "metrics.png"
        if not metrics.exists():
            return
        print(format_summary_table(read_metrics(self.output_dir)), flush=True)
        if png.exists() and png.stat().st_mtime >= metrics.stat().st_mtime:
            return  # a finished run is not rewritten
        if importlib.util.find_spec("matplotlib") is None:  # the `plot` extra
            self._log("install the `plot` extra (matplotlib) to get metrics.png")
            return
        from trl_selfplay.plotting import plot_run

        self._log(f"plot: {plot_run(self.output_dir, png)}")

    def _check_backends(self) -> None:
        """What validation cannot know on another machine: mixed precision without GPU, a missing vLLM."""
        import tempfile

        from trl_selfplay.generation.vllm import is_vllm_available

        r = self.recipe
        for t in range(r.iterations.count):
            it = r.for_iteration(t)
            training = resolve_batch(it, it.training, int(os.environ.get("WORLD_SIZE", "1")))
            build_training_config(
                it.method, training, tempfile.gettempdir(), defaults=loop_training_defaults(it.method)
            )
            if it.method != "sft" and it.generation.backend == "vllm" and not is_vllm_available():
                raise RecipeError(
                    f"{r.source}: `generation.backend` is 'vllm' (iteration {t}) but vLLM is not installed; install "
                    "the `vllm` extra or pass --generation.backend=transformers."
                )

    def _record_recipe(self) -> None:
        import yaml

        path = self.output_dir / "recipe.yaml"
        text = yaml.safe_dump(self.recipe.raw, sort_keys=False)
        if path.exists():
            if path.read_text() == text:
                return
            logger.warning(
                "%s holds a different recipe; finished stages are kept and the run resumes with the new one.", path
            )
        _atomic_write_text(path, text)

    # -- optional SFT warm start (before iteration 0)
    def _sft_warm_start(self) -> None:
        r = self.recipe
        final = self.output_dir / "sft" / "model"
        if final.exists():
            self._log("sft warm start: done, skipping")
            return
        self._log("sft warm start: training")
        if _is_main():
            final.parent.mkdir(parents=True, exist_ok=True)
        _barrier()
        examples = _examples(self.dataset, r, r.sft.num_examples)
        rows = [_sft_example(e["prompt"], e["response"], r.generation.prompt_template) for e in examples]
        self._train_sft(r.model.name_or_path, rows, r.sft.training, final, prefix="sft.training")

    def _train_sft(self, model_path: str, rows: list[dict], training: dict, final: Path, prefix: str) -> dict:
        from datasets import Dataset
        from trl import SFTTrainer

        r = self.recipe
        defaults = {**loop_training_defaults("sft"), "model_init_kwargs": _model_kwargs(r, model_path)}
        config = build_training_config(
            "sft", resolve_batch(r, training, _state().num_processes), str(final.parent / "trainer"),
            defaults=defaults, prefix=prefix,
        )  # fmt: skip
        tokenizer = _load_tokenizer(r, model_path)
        trainer = SFTTrainer(
            model=model_path, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        from transformers.trainer_utils import get_last_checkpoint

        trainer_dir = final.parent / "trainer"
        checkpoint = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
        result = trainer.train(resume_from_checkpoint=checkpoint)
        _save_model(trainer, tokenizer, final)
        history = {"log_history": trainer.state.log_history, "train": result.metrics}
        if _is_main():
            _atomic_write_json(final.parent / "train_metrics.json", history)
        del trainer
        _free_memory()
        return history

    # -- one iteration
    def _iteration(self, t: int) -> None:
        r = self.recipe.for_iteration(t)
        out = iteration_dir(r.output_dir, t)
        if _is_main():
            out.mkdir(parents=True, exist_ok=True)
        _barrier()
        policy = start_model(r, t)
        if (out / "metrics.json").exists():
            self._log(f"iteration {t}: done, skipping")
            if r.hub.push:  # e.g. rerun with --hub.push=true after the run
                self._push(r, t, out)
            return
        self._log(f"iteration {t}: start model {policy}")
        examples = iteration_examples(self.dataset, r, t)

        if r.method == "sft":
            train_rows = self._sft_rows(r, t, examples)
        else:
            generations = self._generate(r, t, out, policy, examples)
            anchor_samples = self._anchor_samples(r, t, out, policy, examples, generations)
            preferences = self._judge_stage(r, t, out, generations) if r.method == "rspo" else None
            train_rows = self._dataset_stage(r, t, out, generations, preferences, anchor_samples)

        if not (out / "model").exists():
            if r.method == "sft":
                self._train_sft(policy, train_rows, r.training, out / "model", prefix="training")
            else:
                self._train(r, t, out, policy, train_rows)
        else:
            self._log(f"iteration {t}: training done, skipping")

        eval_metrics = self._evaluate(r, t, out, policy)
        metrics = self._summarise(r, t, out, policy, eval_metrics)
        self._card(r, t, out, policy, metrics)
        if _is_main():
            _atomic_write_json(out / "metrics.json", metrics)
            self._collect_metrics()
        _barrier()
        if r.hub.push:
            self._push(r, t, out)

    def _sft_rows(self, r: Recipe, t: int, examples: list[dict]) -> list[dict]:
        return [_sft_example(e["prompt"], e["response"], r.generation.prompt_template) for e in examples]

    # -- stage: generate
    def _generate(
        self,
        r: Recipe,
        t: int,
        out: Path,
        policy: str,
        examples: list[dict],
        name: str = "generations",
        num_samples: int | None = None,
        seed: int | None = None,
    ) -> list[dict]:
        path = out / f"{name}.jsonl"
        if path.exists():
            self._log(f"iteration {t}: {name} done, skipping")
            return _read_jsonl(path)
        from trl_selfplay.generation import generate_completions

        g = r.generation
        num_samples = g.num_samples if num_samples is None else num_samples
        self._log(f"iteration {t}: {name}: {num_samples} completion(s) for {len(examples)} prompts from {policy}")
        tokenizer = _load_tokenizer(r, policy)
        backend_kwargs = dict(g.backend_kwargs)
        if g.backend == "vllm":
            model: Any = policy
            backend_kwargs.setdefault("trust_remote_code", r.model.trust_remote_code)
            if policy == r.model.name_or_path and r.model.revision is not None:
                backend_kwargs.setdefault("revision", r.model.revision)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(policy, **_model_kwargs(r, policy))
            model.to(_state().device)
            model.eval()
        output = generate_completions(
            model,
            [e["prompt"] for e in examples],
            tokenizer=tokenizer,
            backend=g.backend,
            num_samples=num_samples,
            temperature=g.temperature,
            top_p=g.top_p,
            max_new_tokens=g.max_new_tokens,
            seed=g.seed + t if seed is None else seed,
            prompt_template=g.prompt_template,
            batch_size=g.batch_size,
            accelerator=_state(),
            **backend_kwargs,
        )
        del model
        _free_memory()  # generation memory is released before the judge and the trainer load their models
        rows = [
            {"prompt": e["prompt"], "response": e["response"], "completions": c, "num_tokens": n}
            for e, c, n in zip(examples, output.completions, output.num_tokens)
        ]
        if _is_main():
            _atomic_write_jsonl(path, rows, pause=(r, "generate" if name == "generations" else name, t))
        _barrier()
        return rows

    def _anchor_samples(
        self, r: Recipe, t: int, out: Path, policy: str, examples: list[dict], generations: list[dict]
    ) -> list[str] | None:
        """RSPO's `forward_kl`: one response per prompt sampled from μ. When π_t is μ (iteration 0 without a
        separate anchor) sample 0 of π_t's K samples is one; otherwise μ samples once more, with its own seed."""
        if not needs_anchor_samples(r):
            return None
        anchor = anchor_model(r)
        if anchor == policy:
            return [g["completions"][0] for g in generations]
        # A seed range apart from the policy's (g.seed + t), so μ's sampling noise is not π_t's.
        seed = r.generation.seed + 1_000_003 + t
        rows = self._generate(r, t, out, anchor, examples, name="anchor_generations", num_samples=1, seed=seed)
        return [row["completions"][0] for row in rows]

    # -- stage: judge (RSPO)
    def _judge_stage(self, r: Recipe, t: int, out: Path, generations: list[dict]) -> list[dict]:
        path = out / "preferences.jsonl"
        if path.exists():
            self._log(f"iteration {t}: preferences done, skipping")
            return _read_jsonl(path)
        from accelerate.utils import gather_object

        from trl_selfplay.losses import win_probabilities

        self._log(f"iteration {t}: judging {len(generations)} prompts × {r.generation.num_samples} samples")
        judge = self._judge(r)
        state = _state()
        indices = list(range(len(generations)))
        with state.split_between_processes(indices) as shard:
            shard = list(shard)
            local = []
            if shard:
                matrices = judge.preference_matrix(
                    [generations[i]["prompt"] for i in shard], [generations[i]["completions"] for i in shard]
                )
                local = [(i, m.tolist()) for i, m in zip(shard, matrices)]
        gathered = gather_object(local) if state.num_processes > 1 else local
        matrices = dict(gathered)
        del judge
        _free_memory()
        import torch

        rows = []
        for i in indices:
            matrix = torch.tensor(matrices[i], dtype=torch.float64)
            wins = win_probabilities(matrix)
            chosen, rejected = int(torch.argmax(wins)), int(torch.argmin(wins))
            rows.append(
                {
                    "preferences": matrices[i],
                    "win_probs": wins.tolist(),
                    "chosen_index": chosen,
                    "rejected_index": rejected,
                }
            )
        if _is_main():
            _atomic_write_jsonl(path, rows, pause=(r, "judge", t))
        _barrier()
        return rows

    # -- stage: dataset
    def _dataset_stage(
        self,
        r: Recipe,
        t: int,
        out: Path,
        generations: list[dict],
        preferences: list[dict] | None,
        anchor_samples: list[str] | None = None,
    ) -> list[dict]:
        path = out / "train.jsonl"
        if path.exists():
            return _read_jsonl(path)
        template = r.generation.prompt_template
        rows: list[dict] = []
        if r.method == "rspo":
            for gen, pref in zip(generations, preferences):
                c, l_ = pref["chosen_index"], pref["rejected_index"]
                row = _pair(gen["prompt"], gen["completions"][c], gen["completions"][l_], template)
                row["chosen_win_prob"] = pref["win_probs"][c]
                row["rejected_win_prob"] = pref["win_probs"][l_]
                rows.append(row)
            for row, sample in zip(rows, anchor_samples or []):
                row["anchor_completion"] = _format_response(sample, template)
        else:
            mix = r.data.mix_previous_iterations
            mix = (1 if r.method == "spin" else 0) if mix is None else mix
            sources: Iterable[list[dict]] = [generations]
            previous = [
                _read_jsonl(iteration_dir(r.output_dir, s) / "generations.jsonl") for s in range(max(0, t - mix), t)
            ]
            # As the original SPIN: iteration t trains on its own pairs plus the previous iterations' pairs.
            for gens in [*previous, *sources]:
                rows.extend(_pair(g["prompt"], g["response"], g["completions"][0], template) for g in gens)
        if _is_main():
            _atomic_write_jsonl(path, rows)
        _barrier()
        return rows

    # -- stage: reference pass + training
    def _train(self, r: Recipe, t: int, out: Path, policy: str, rows: list[dict]) -> None:
        self._log(f"iteration {t}: training {r.method} on {len(rows)} pairs from {policy}")
        training = resolve_batch(r, r.training, _state().num_processes)
        defaults = {**loop_training_defaults(r.method), "model_init_kwargs": _model_kwargs(r, policy)}
        if r.method == "rspo" and "anchor_model_name_or_path" not in training:
            anchor = anchor_model(r)
            # At iteration 0 without an explicit anchor, μ is the policy itself (the trainer reuses the reference).
            defaults["anchor_model_name_or_path"] = None if anchor == policy else anchor
            if anchor != policy and "revision" in _model_kwargs(r, anchor):
                defaults["anchor_model_init_kwargs"] = {"revision": _model_kwargs(r, anchor)["revision"]}
        config = build_training_config(r.method, training, str(out / "trainer"), defaults=defaults)
        tokenizer = _load_tokenizer(r, policy)
        trainer_cls = _trainer_class(r.method)
        # The trainer computes π_t's (and μ's) log-probs of every pair in __init__ (precompute_ref_log_probs), so
        # no reference model is resident during training.
        trainer = trainer_cls(
            model=policy, args=config, train_dataset=self._shared_dataset(rows, out / "trainer" / "dataset"),
            processing_class=tokenizer,
        )  # fmt: skip
        reference = self._reference(r, t, trainer)
        if r.method == "iris":
            trainer.args.alpha = reference["alpha"]
        pause_step = _pause_step("train", t)
        if pause_step is not None:
            trainer.add_callback(_PauseCallback(r, t, pause_step))
        # A run killed during training resumes from the trainer's last checkpoint of this iteration when the recipe
        # saves some (`training.save_strategy`), otherwise it trains this iteration again from π_t.
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(str(out / "trainer")) if (out / "trainer").is_dir() else None
        if checkpoint is not None:
            self._log(f"iteration {t}: resuming training from {checkpoint}")
        result = trainer.train(resume_from_checkpoint=checkpoint)
        _save_model(trainer, tokenizer, out / "model")
        if _is_main():
            _atomic_write_json(
                out / "train_metrics.json", {"log_history": trainer.state.log_history, "train": result.metrics}
            )
        del trainer
        _free_memory()

    @staticmethod
    def _shared_dataset(rows: list[dict], path: Path):
        """A file-backed dataset: TRL caches the precomputed log-probs next to the dataset's files, which every
        process must see (an in-memory dataset caches in a per-process temporary directory)."""
        from datasets import Dataset, load_from_disk

        if _is_main():
            shutil.rmtree(path, ignore_errors=True)
            Dataset.from_list(rows).save_to_disk(str(path))
        _barrier()
        return load_from_disk(str(path))

    def _reference(self, r: Recipe, t: int, trainer) -> dict[str, Any]:
        """π_t's log-probs of the pairs (from the trainer's precompute pass); IRIS: the gap D̂_t and α_t."""
        data = trainer.train_dataset
        record: dict[str, Any] = {
            "reference_model": start_model(r, t),
            "ref_chosen_logps": list(data["ref_chosen_logps"]),
            "ref_rejected_logps": list(data["ref_rejected_logps"]),
            "chosen_lengths": [len(ids) for ids in data["chosen_ids"]],
            "rejected_lengths": [len(ids) for ids in data["rejected_ids"]],
        }
        if r.method == "iris":
            import torch

            from trl_selfplay.losses import distribution_gap, iris_alpha

            gap = distribution_gap(
                torch.tensor(record["ref_chosen_logps"]),
                torch.tensor(record["ref_rejected_logps"]),
                torch.tensor(record["chosen_lengths"]),
                torch.tensor(record["rejected_lengths"]),
            )
            initial_gap = gap
            if t > 0:
                with open(iteration_dir(r.output_dir, 0) / "reference.json") as f:
                    initial_gap = json.load(f)["gap"]
            cfg = trainer.args
            alpha = iris_alpha(
                cfg.alpha_schedule,
                t,
                r.iterations.count,
                alpha=cfg.alpha,
                alpha_start=cfg.alpha_start,
                alpha_end=cfg.alpha_end,
                gap=gap,
                initial_gap=initial_gap,
            )
            record.update(gap=float(gap), initial_gap=float(initial_gap), alpha=float(alpha))
            self._log(f"iteration {t}: IRIS gap D_t={gap:.4f} (D_0={initial_gap:.4f}) -> alpha_t={alpha:.4f}")
        if _is_main():
            _atomic_write_json(iteration_dir(r.output_dir, t) / "reference.json", record)
        _barrier()
        return record

    # -- stage: evaluation
    def _call_evaluation(self, r: Recipe, **call: Any) -> dict[str, Any]:
        fn = import_callable(r.evaluation.function, "evaluation.function")
        params = inspect.signature(fn).parameters
        accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        call = {k: v for k, v in call.items() if accepts_all or k in params}
        return dict(fn(**call, **r.evaluation.kwargs) or {})

    def _evaluation_inputs(self, r: Recipe) -> dict[str, Any]:
        return {
            "prompt_template": r.generation.prompt_template,
            "judge": self._judge(r) if r.judge is not None else None,
            "generation": dataclasses.asdict(r.generation),
            "seed": r.generation.seed,
        }

    def _evaluate_initial(self) -> None:
        r = self.recipe
        path = self.output_dir / "initial_eval.json"
        if not path.exists():
            self._log("evaluating the start model")
            metrics = {}
            if _is_main():
                metrics = self._call_evaluation(
                    r,
                    model_name_or_path=start_model(r, 0),
                    previous_model_name_or_path=None,
                    iteration=-1,
                    output_dir=str(self.output_dir),
                    **self._evaluation_inputs(r),
                )
                _atomic_write_json(path, metrics)
            _barrier()
        if _is_main():
            self._collect_metrics()
        _barrier()

    def _evaluate(self, r: Recipe, t: int, out: Path, policy: str) -> dict[str, Any] | None:
        if r.evaluation is None:
            return None
        path = out / "eval.json"
        if not path.exists():
            self._log(f"iteration {t}: evaluating")
            if _is_main():
                metrics = self._call_evaluation(
                    r,
                    model_name_or_path=str(out / "model"),
                    previous_model_name_or_path=policy,
                    iteration=t,
                    output_dir=str(out),
                    **self._evaluation_inputs(r),
                )
                _atomic_write_json(path, metrics)
            _barrier()
            _free_memory()
        with open(path) as f:
            return json.load(f)

    # -- metrics, card, push
    def _summarise(self, r: Recipe, t: int, out: Path, policy: str, eval_metrics: dict | None) -> dict[str, Any]:
        with open(out / "train_metrics.json") as f:
            history = json.load(f)
        last_logged = {}
        for entry in history["log_history"]:
            if "loss" in entry:
                last_logged = entry
        summary: dict[str, Any] = {
            "iteration": t,
            "num_completed_iterations": t + 1,
            "method": r.method,
            "model": str(out / "model"),
            "start_model": policy,
            "train": {**{k: v for k, v in last_logged.items() if isinstance(v, int | float)}, **history["train"]},
            "eval": eval_metrics or {},
        }
        reference = out / "reference.json"
        if reference.exists():
            with open(reference) as f:
                ref = json.load(f)
            for key in ("gap", "alpha", "initial_gap"):
                if key in ref:
                    summary["train"][f"iris/{key}"] = ref[key]
        return summary

    def _collect_metrics(self) -> None:
        """Rebuild `<output_dir>/metrics.jsonl` from the per-iteration files, so resuming never duplicates a line."""
        lines = []
        initial = self.output_dir / "initial_eval.json"
        if initial.exists():
            with open(initial) as f:
                lines.append(
                    {
                        "iteration": -1,
                        "num_completed_iterations": 0,
                        "method": self.recipe.method,
                        "model": start_model(self.recipe, 0),
                        "train": {},
                        "eval": json.load(f),
                    }
                )
        for t in range(self.recipe.iterations.count):
            path = iteration_dir(self.output_dir, t) / "metrics.json"
            if path.exists():
                with open(path) as f:
                    lines.append(json.load(f))
        _atomic_write_jsonl(self.output_dir / "metrics.jsonl", lines)

    def _card(self, r: Recipe, t: int, out: Path, policy: str, metrics: dict) -> None:
        from trl_selfplay.hub import model_card

        if _is_main():
            text = model_card(r, t, policy, metrics)
            _atomic_write_text(out / "model" / "README.md", text)
        _barrier()

    def _push(self, r: Recipe, t: int, out: Path) -> None:
        from trl_selfplay.hub import push_iteration, repo_id_for

        path = out / "push.json"
        if path.exists():
            return
        if _is_main():
            info = push_iteration(
                out / "model", repo_id_for(r.hub.model_id, t), private=r.hub.private, api=self.hub_api
            )
            _atomic_write_json(path, info)
        _barrier()


def run_recipe(recipe: Recipe, hub_api: Any = None) -> None:
    """Run (or resume) every iteration of a validated recipe."""
    SelfPlayLoop(copy.deepcopy(recipe), hub_api=hub_api).run()
