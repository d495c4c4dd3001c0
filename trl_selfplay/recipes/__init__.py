"""YAML recipes: one file describes one full multi-iteration self-play run.

A recipe is read with `yaml.safe_load`, validated completely (types, unknown keys with the nearest valid key
suggested, the method's TRL config built once per iteration) and resolved per iteration, all before any model or
dataset is loaded. `trl-selfplay --dry-run recipe.yaml` prints what each iteration would run.

Format (every section but `method`, `model`, `data` and `output_dir` is optional)::

    method: spin                       # a registered method (trl_selfplay.methods): spin | iris | rspo | sft (continued-SFT baseline: each iteration trains
                                       # trl.SFTTrainer on the same prompts' annotated responses with the same
                                       # epochs and batch size as the self-play run, no generation)
    output_dir: runs/zephyr-spin       # iteration t writes to <output_dir>/iter_<t>/
    global_batch_size: 64              # optional: gradient_accumulation_steps is derived from it at launch time
    model:
      name_or_path: alignment-handbook/zephyr-7b-sft-full
      revision: null                   # pin a Hub revision (commit sha) for reproducibility
      dtype: bfloat16                  # auto | float32 | bfloat16 | float16
      trust_remote_code: false
      anchor_name_or_path: null        # RSPO μ; default: the model iteration 0 starts from
      build_fn: null                   # "module:function" called as fn(name_or_path) when the path does not exist
    data:
      dataset_name: HuggingFaceH4/ultrachat_200k   # Hub dataset, a local directory (save_to_disk) or a data file
      dataset_config: null
      data_files: null
      dataset_fn: null                 # alternative: "module:function" returning a datasets.Dataset (split=...)
      split: train_sft
      prompt_column: prompt            # a string, or a conversation whose first user turn is the prompt
      response_column: messages        # annotated answer (spin/iris/sft): a string or a conversation (first
                                       # assistant turn after the prompt)
      num_prompts: 50000               # first N prompts after a seeded shuffle; null = all
      seed: 42
      num_folds: 1                     # RSPO: prompts split in folds, iteration t uses fold t mod num_folds
      mix_previous_iterations: 1       # SPIN: also train on the generated pairs of the previous N iterations
      train_prompt_format: generation  # generation (pairs rendered as generation formatted the prompt) |
                                       # chat_template (the model's chat template, as the original SPIN trains)
      system_message: null             # with chat_template: a system turn ("" = empty system message)
    generation:
      backend: transformers            # transformers | vllm
      num_samples: 1                   # K completions per prompt (RSPO: K >= 2)
      temperature: 1.0
      top_p: 1.0
      max_new_tokens: 256
      seed: 0                          # iteration t samples with seed + t
      prompt_template: null            # null = chat template; else a string with {prompt}. Training uses the
                                       # same formatting unless `data.train_prompt_format: chat_template`.
      add_special_tokens: null         # null: BOS for plain-text prompts only; false: never; true: always
      batch_size: 16
      backend_kwargs: {}               # e.g. vLLM: {tensor_parallel_size: 8, gpu_memory_utilization: 0.9}
    judge:                             # RSPO only
      type: pairrm                     # pairrm | function
      model_name_or_path: llm-blender/PairRM
      function: null                   # type function: "module:function"
      kind: reward                     # function judges: reward (fn(prompts, completions) -> scores) | pairwise
      mode: null                       # aggregate (SPPO rank.py + compute_prob.py; PairRM default) | pairwise
      prompt_format: null              # judge input: chat_template (PairRM default) | raw (function default)
      temperature: 1.0
      batch_size: 32
      kwargs: {}                       # extra keyword arguments of the judge class
    training:                          # fields of the method's TRL config (SPINConfig, IRISConfig, RSPOConfig,
      learning_rate: 5.0e-7            # trl.SFTConfig), with TRL's names. `warmup_ratio` is mapped to
      beta: 0.1                        # transformers 5's fractional `warmup_steps`.
    iterations:
      count: 4
      overrides:                       # per-iteration deep overrides of data/generation/judge/training/evaluation
        3: {training: {beta: 5.0}}     # (each applies to that iteration only)
    hub:
      push: false
      model_id: my-org/zephyr-7b-spin  # iteration t is pushed to its own repo "<model_id>-iter<t>"
      private: false
    sft:                               # optional warm start before iteration 0 (trl.SFTTrainer on the annotated
      num_examples: null               # data; null = every row of the dataset split), written to <output_dir>/sft/
      training: {learning_rate: 2.0e-4, num_train_epochs: 1}
    evaluation:                        # optional, run after the start model and after every iteration
      function: trl_selfplay.evaluation:evaluate_iteration
      <any other key>: passed to the function as a keyword argument (checked against its signature)

Evaluation hook contract: the function is called on the main process as
``fn(model_name_or_path=..., previous_model_name_or_path=..., iteration=..., output_dir=..., prompt_template=...,
judge=..., generation=..., seed=..., **kwargs)`` (only the parameters its signature accepts, or all of them if it
takes ``**kwargs``) and returns a dict of JSON-serialisable metrics. For the start model `iteration` is -1 and
`previous_model_name_or_path` is None. The loop appends one line per evaluated model to
`<output_dir>/metrics.jsonl`: ``{"iteration": t, "num_completed_iterations": t + 1, "method": ..., "model": ...,
"train": {...}, "eval": {...}}``.

CLI overrides use dotted keys with YAML-typed values: ``--training.learning_rate=1e-6``,
``--iterations.overrides.3.training.beta=5.0``, ``--generation.prompt_template=null``.
"""

from trl_selfplay.errors import RecipeError
from trl_selfplay.recipes.configs import build_training_config, config_class, config_to_dict, resolve_batch
from trl_selfplay.recipes.dry_run import dry_run
from trl_selfplay.recipes.layout import anchor_model, iteration_dir, sft_dir, start_model
from trl_selfplay.recipes.parse import import_callable, load_recipe, parse, parse_overrides, validate
from trl_selfplay.recipes.schema import (
    DataArgs,
    EvaluationArgs,
    GenerationArgs,
    HubArgs,
    IterationsArgs,
    JudgeArgs,
    ModelArgs,
    Recipe,
    SFTStageArgs,
)

__all__ = [
    "DataArgs", "EvaluationArgs", "GenerationArgs", "HubArgs", "IterationsArgs", "JudgeArgs", "ModelArgs", "Recipe",
    "RecipeError", "SFTStageArgs", "anchor_model", "build_training_config", "config_class", "config_to_dict",
    "dry_run", "import_callable", "iteration_dir", "load_recipe", "parse", "parse_overrides", "resolve_batch",
    "sft_dir", "start_model", "validate",
]  # fmt: skip
