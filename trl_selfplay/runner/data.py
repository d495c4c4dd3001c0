"""The runner's data: the recipe's dataset, the prompts of each iteration, and TRL-format training rows."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl_selfplay.errors import RecipeError
from trl_selfplay.methods import get_method
from trl_selfplay.recipes import Recipe, import_callable

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset(recipe: Recipe, load_remote: bool = True):
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
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise RecipeError(f"`data.dataset_name`: cannot read {path} (use .jsonl, .json, .csv or .parquet).")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(str(path), d.dataset_config, data_files=d.data_files, split=d.split)
    if not load_remote:
        return None
    return datasets.load_dataset(
        d.dataset_name, d.dataset_config, data_files=d.data_files, split=d.split, revision=d.revision
    )


def source_key(recipe: Recipe) -> str:
    """What identifies the dataset a recipe's `data` section loads (not which rows of it are used)."""
    d = recipe.data
    fields = (d.dataset_name, d.dataset_config, d.data_files, d.dataset_fn, d.revision, d.split)
    return json.dumps(fields, sort_keys=True, default=str)


def _needed_columns(recipe: Recipe) -> dict[str, str]:
    needed = {"data.prompt_column": recipe.data.prompt_column}
    if recipe.data.response_column and (get_method(recipe.method).needs_response or recipe.sft is not None):
        needed["data.response_column"] = recipe.data.response_column
    return needed


def describe_source(recipe: Recipe) -> str:
    """The dataset in words, for messages: the local file, or the Hub dataset and split, or the function."""
    d = recipe.data
    if d.dataset_fn is not None:
        return f"the dataset of `data.dataset_fn` ({d.dataset_fn})"
    if Path(d.dataset_name).is_file():
        return str(d.dataset_name)
    return f"{d.dataset_name} (split {d.split!r})"


def _diagnose_file(path: Path) -> str | None:
    """Why a local data file cannot be read, in one sentence naming the line; None when no reason is found."""
    if path.stat().st_size == 0:
        return f"{path} is empty (0 bytes): give `data.dataset_name` a file with at least one row"
    if path.suffix not in (".jsonl", ".json", ".csv"):
        return None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{path} line {number} is not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}): "
                    "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                )
            if path.suffix == ".jsonl" and text.strip():
                try:
                    json.loads(text)
                except ValueError as error:
                    return f"{path} line {number} is not a JSON object ({error}): fix or remove that line"
    return None


def check_data(recipe: Recipe, load_remote: bool = True):
    """Load the dataset (remote ones only if `load_remote`) and check it has rows and the columns the method needs.
    A local file that cannot be read is named with the line at fault (0 bytes, non-UTF-8 bytes, a broken line)."""
    d = recipe.data
    local = Path(d.dataset_name) if d.dataset_fn is None and d.dataset_name else None
    if local is not None and local.is_file() and local.stat().st_size == 0:
        raise RecipeError(f"{recipe.source}: `data.dataset_name`: {_diagnose_file(local)}.")
    try:
        dataset = load_dataset(recipe, load_remote=load_remote)
    except RecipeError:
        raise
    except Exception as error:
        reason = _diagnose_file(local) if local is not None and local.is_file() else None
        if reason is not None:
            raise RecipeError(f"{recipe.source}: `data.dataset_name`: {reason}.") from error
        raise RecipeError(
            f"{recipe.source}: cannot load the dataset of `data`: {type(error).__name__}: {error}"
        ) from error
    if dataset is None:
        return None
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise RecipeError(
            f"{recipe.source}: {describe_source(recipe)} has no rows; give `data` a dataset with prompts."
        )
    for field_name, column in _needed_columns(recipe).items():
        if column not in dataset.column_names:
            raise RecipeError(
                f"{recipe.source}: `{field_name}` is {column!r}, but the dataset has no such column (columns: "
                f"{dataset.column_names}). Set `{field_name}` to the column holding the "
                f"{'prompt' if field_name.endswith('prompt_column') else 'annotated response'}."
            )
    return dataset


def message_text(value: Any, role: str, column: str) -> str:
    """A prompt / response column holds a string, or a conversation whose first `role` turn is the text (e.g.
    UCLA-AGI/SPIN_iter0's `real` column: [user turn, assistant turn])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in value:
            if isinstance(message, dict) and message.get("role") == role and isinstance(message.get("content"), str):
                return message["content"]
    what = "a prompt" if role == "user" else "an annotated response"
    if value is None:
        raise RecipeError(f"`data.{column}`: {what} is None (missing).")
    raise RecipeError(f"`data.{column}`: cannot read {what} from {str(value)[:80]!r}.")


def _row_before_shuffle(num_rows: int, seed: int, position: int) -> int:
    """The row of the dataset as loaded that `dataset.shuffle(seed=seed)` puts at `position` (the permutation
    depends on the seed and the number of rows only)."""
    from datasets import Dataset

    return Dataset.from_dict({"row": list(range(num_rows))}).shuffle(seed=seed)[position]["row"]


def examples(dataset, recipe: Recipe, limit: int | None) -> list[dict[str, str | None]]:
    """Seeded shuffle, then the first `limit` rows as {"prompt", "response"} (response None without a column).
    A prompt or response that is None or not readable is one error naming the dataset row (and file line)."""
    d = recipe.data
    shuffled = dataset.shuffle(seed=d.seed)
    if limit is not None:
        shuffled = shuffled.select(range(min(limit, len(shuffled))))
    columns = [d.prompt_column] + ([d.response_column] if d.response_column in shuffled.column_names else [])
    try:
        selected = shuffled.select_columns(columns).to_list()
    except UnicodeDecodeError as error:  # bytes that are not UTF-8 can load and fail only when read as text
        path = Path(d.dataset_name) if d.dataset_fn is None and d.dataset_name else None
        reason = _diagnose_file(path) if path is not None and path.is_file() else None
        raise RecipeError(
            f"{recipe.source}: {reason or f'{describe_source(recipe)} is not UTF-8 text ({error})'}."
        ) from None
    out = []
    for position, row in enumerate(selected):
        try:
            response = (
                message_text(row[d.response_column], "assistant", "response_column")
                if d.response_column in row
                else None
            )
            out.append({"prompt": message_text(row[d.prompt_column], "user", "prompt_column"), "response": response})
        except RecipeError as error:
            index = _row_before_shuffle(len(dataset), d.seed, position)
            line = f" (line {index + 1})" if str(d.dataset_name or "").endswith(".jsonl") else ""
            raise RecipeError(
                f"{recipe.source}: {error} This is row {index}{line} of {describe_source(recipe)}: drop or fix that "
                "row (or point the column field at the right column)."
            ) from None
    return out


def iteration_examples(dataset, recipe: Recipe, t: int) -> list[dict[str, str | None]]:
    """The prompts of iteration t: the same `num_prompts` every iteration, or fold t of them (`num_folds`)."""
    rows = examples(dataset, recipe, recipe.data.num_prompts)
    folds = recipe.data.num_folds
    if folds > 1:
        size = len(rows) // folds
        fold = t % folds
        rows = rows[fold * size : (fold + 1) * size]
    return rows


@dataclass(frozen=True)
class TrainingFormat:
    """How training rows render prompts and responses, in TRL's formats.

    `prompt_template` set and `chat=False`: plain text, the prompt exactly as generation formatted it. Otherwise
    conversational rows (TRL renders them with the tokenizer's chat template), with `system_message` as a system
    turn when it is not None — the original SPIN's training format (`spin/alignment/data.py::apply_chat_template`:
    chat template, empty system message, responses as assistant turns).
    """

    prompt_template: str | None = None
    chat: bool = False
    system_message: str | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> TrainingFormat:
        chat = recipe.data.train_prompt_format == "chat_template"
        return cls(recipe.generation.prompt_template, chat, recipe.data.system_message)

    @property
    def plain_text(self) -> bool:
        return self.prompt_template is not None and not self.chat

    def prompt(self, prompt: str) -> str | list[dict[str, str]]:
        if self.plain_text:
            return self.prompt_template.replace("{prompt}", prompt)
        system = [] if self.system_message is None else [{"role": "system", "content": self.system_message}]
        return [*system, {"role": "user", "content": prompt}]

    def completion(self, response: str) -> str | list[dict[str, str]]:
        return response if self.plain_text else [{"role": "assistant", "content": response}]

    def pair(self, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
        """TRL's preference row."""
        return {
            "prompt": self.prompt(prompt),
            "chosen": self.completion(chosen),
            "rejected": self.completion(rejected),
        }

    def sft(self, prompt: str, response: str) -> dict[str, Any]:
        """TRL's prompt-completion row."""
        return {"prompt": self.prompt(prompt), "completion": self.completion(response)}
