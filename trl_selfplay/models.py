"""One way to load a causal LM and its tokenizer, shared by generation, evaluation and the runner.

Every loader of the package goes through here so the same `dtype` / `revision` / `trust_remote_code` reach
`from_pretrained` everywhere. `trust_remote_code` is off unless the caller turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["default_device", "default_dtype", "load_causal_lm", "load_tokenizer", "model_init_kwargs"]

# Floating dtypes a checkpoint is loaded in; "auto" keeps the checkpoint's own (`torch_dtype` of its config).
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "float64")


def _resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"`dtype` must be one of {DTYPE_NAMES} (or a `torch.dtype`), got {dtype!r}.")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def model_init_kwargs(
    *, dtype: str | torch.dtype = "auto", revision: str | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Keyword arguments of `AutoModelForCausalLM.from_pretrained` (and of TRL's `model_init_kwargs`).

    Args:
        dtype: `"auto"` (the checkpoint's dtype), a dtype name such as `"bfloat16"`, or a `torch.dtype`.
        revision: a Hub revision (branch, tag or commit sha) to pin; left out when `None`.
        trust_remote_code: allow the checkpoint's own modelling code (off by default).

    Returns:
        `{"dtype": torch.dtype or "auto", "trust_remote_code": ..., "revision": ...}` (`revision` only when set).
    """
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f"`trust_remote_code` must be true or false, got {trust_remote_code!r}.")
    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(name_or_path)` with the same `revision` / `trust_remote_code` as the model."""
    from transformers import AutoTokenizer

    kwargs = model_init_kwargs(revision=revision, trust_remote_code=trust_remote_code)
    kwargs.pop("dtype")
    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """`AutoModelForCausalLM.from_pretrained` in eval mode, moved to `device` when one is given.

    Args:
        name_or_path: a local directory or a Hub name.
        dtype, revision, trust_remote_code: see `model_init_kwargs`.
        device: where to move the model (`None`: where `from_pretrained` put it, the CPU by default).
    """
    from transformers import AutoModelForCausalLM

    kwargs = model_init_kwargs(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device) -> str:
    """The dtype inference loads a checkpoint in on `device`: its own on a GPU, float32 on the CPU (where bf16 /
    fp16 matmuls are slow or unsupported)."""
    import torch

    return "auto" if torch.device(device).type == "cuda" else "float32"
