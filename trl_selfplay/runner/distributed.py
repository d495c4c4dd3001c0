"""Process-group helpers of the runner: one accelerate state, barriers, main-process checks, teardown."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

from trl_selfplay.errors import RecipeError


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _multi_process_cpu() -> bool:
    # DeepSpeed must keep its own launch: `use_cpu` would disable it (the trainers pick gloo for it themselves).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and _cpu_only() and not deepspeed


def setup_distributed() -> None:
    """Several processes on a machine without GPU (`accelerate launch --multi_gpu --num_processes N` on CPU): make
    accelerate and the Trainer's arguments both pick the gloo CPU backend instead of silently running N copies."""
    if _multi_process_cpu():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def state():
    """accelerate's process state (created once, shared with the trainers)."""
    from accelerate import PartialState

    return PartialState(cpu=_multi_process_cpu())


def barrier() -> None:
    state().wait_for_everyone()


def is_main() -> bool:
    return state().is_main_process


def num_processes() -> int:
    return state().num_processes


def on_main(fn: Callable[[], Any]) -> None:
    """Run `fn` on the main process only; an error there is raised on every process (the others would otherwise wait
    at the next barrier until the collective timeout): a RecipeError with the same message, else a RuntimeError."""
    error: BaseException | None = None
    if is_main():
        try:
            fn()
        except Exception as caught:
            error = caught
    if num_processes() > 1:
        from accelerate.utils import broadcast_object_list

        payload: list[Any] = [None if error is None else (isinstance(error, RecipeError), str(error))]
        broadcast_object_list(payload, from_process=0)
        if not is_main() and payload[0] is not None:
            is_recipe_error, message = payload[0]
            raise RecipeError(message) if is_recipe_error else RuntimeError(f"the main process failed: {message}")
    if error is not None:
        raise error


def shutdown_distributed() -> None:
    """Wait for every process, then tear the process group down explicitly: left to interpreter exit, the gloo /
    DeepSpeed CPU threads can abort one process after all the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def free_memory() -> None:
    """Release a stage's models before the next stage loads its own."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
