"""Prompt formatting shared by generation, training and judging, so all of them read the same text.

Two explicit choices (docs/pipeline.md, stage 1):
- `prompt_template=None`: the tokenizer's chat template with the generation prompt (TRL's conversational path);
- `prompt_template="... {prompt} ..."`: a fixed template filled with the plain-text prompt, e.g. SPIN's original
  `"### Instruction: {prompt}\\n\\n### Response: "` (TRL's plain-text path).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Prompt",
    "encode_prompt",
    "format_prompt",
    "judge_source_text",
    "uses_special_tokens",
    "validate_prompt_template",
]

Prompt = str | list[dict[str, Any]]


def validate_prompt_template(prompt_template: str | None) -> None:
    """Raise one clear `ValueError` for a template that cannot be filled."""
    if prompt_template is None:
        return
    if not isinstance(prompt_template, str) or "{prompt}" not in prompt_template:
        raise ValueError(
            f"`prompt_template` must be a string containing the placeholder '{{prompt}}', got {prompt_template!r}. "
            "Use e.g. '### Instruction: {prompt}\\n\\n### Response: ', or None for the tokenizer's chat template."
        )


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def _messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if _is_conversation(prompt):
        return list(prompt)
    raise ValueError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")


def _fill_template(prompt: Prompt, prompt_template: str) -> str:
    if not isinstance(prompt, str):
        raise ValueError(
            "`prompt_template` fills plain-string prompts, but a conversation was given; "
            "pass the prompt as a string or set `prompt_template=None` to use the chat template."
        )
    # str.replace, not str.format: prompts and templates may contain other braces.
    return prompt_template.replace("{prompt}", prompt)


def _require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template; set `prompt_template` (a string with '{prompt}') to format prompts."
        )


def format_prompt(tokenizer, prompt: Prompt, prompt_template: str | None = None) -> str:
    """Return the exact string generation conditions on.

    Args:
        tokenizer: the policy's tokenizer (its chat template is used when `prompt_template` is `None`).
        prompt: a plain string, or a conversation (list of `{"role", "content"}` messages).
        prompt_template: `None` for the chat template, or a string with `{prompt}` for a fixed template. A fixed
            template needs plain-string prompts (a conversation has no single text to put in it).
    """
    validate_prompt_template(prompt_template)
    if prompt_template is not None:
        return _fill_template(prompt, prompt_template)
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)


def uses_special_tokens(prompt_template: str | None, add_special_tokens: bool | None = None) -> bool:
    """Whether the tokenizer adds its special tokens (e.g. BOS) to a formatted prompt.

    `add_special_tokens=None` follows TRL's tokenisation for training: a chat-templated prompt already carries any
    BOS in its text, so none is added; a plain-text prompt (a fixed template) goes through `tokenizer(text)`, which
    adds them (e.g. Llama/Mistral's `<s>`). `True` / `False` force the choice, e.g. `False` as uclaml/SPIN's
    `spin/generate.py` tokenises its `### Instruction: ...` prompts.
    """
    if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
        raise ValueError(
            f"`add_special_tokens` must be true, false or null (the default rule), got {add_special_tokens!r}."
        )
    return prompt_template is not None if add_special_tokens is None else add_special_tokens


def encode_prompt(
    tokenizer, prompt: Prompt, prompt_template: str | None = None, add_special_tokens: bool | None = None
) -> list[int]:
    """Token ids of the formatted prompt (`format_prompt`), with special tokens as `uses_special_tokens` says."""
    text = format_prompt(tokenizer, prompt, prompt_template)
    return tokenizer(text, add_special_tokens=uses_special_tokens(prompt_template, add_special_tokens))["input_ids"]


def judge_source_text(
    tokenizer, prompt: Prompt, prompt_template: str | None = None, *, cut_at_first_none: bool = False
) -> str:
    """The prompt text a judge such as PairRM reads as its source, as uclaml/SPPO passes it.

    uclaml/SPPO's `scripts/rank.py` (`apply_template`, also in `scripts/generate.py`) renders the user turn followed
    by an assistant turn whose content is the string `"None"` with the policy's chat template, and keeps the text
    before `"None"`: the user turn, cut before the assistant content (the template's BOS and assistant header
    included). A conversation prompt gets the assistant turn after its last message.

    Args:
        tokenizer: the policy's tokenizer (its chat template).
        prompt: a plain string or a conversation.
        prompt_template: when set, the source is the fixed template filled with the prompt (`format_prompt`).
        cut_at_first_none: the original splits at the *first* `"None"`, so a prompt that contains the word is cut
            there too (docs/fidelity.md); `True` does the same. Default: cut at the assistant content only, which is
            the original's text for every prompt without the word.
    """
    validate_prompt_template(prompt_template)
    if prompt_template is not None:
        return _fill_template(prompt, prompt_template)
    _require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [*_messages(prompt), {"role": "assistant", "content": "None"}], tokenize=False
    )
    if "None" not in rendered:
        raise ValueError("The chat template does not render an assistant turn, so the prompt cannot be cut before it.")
    # The assistant content is the last message, so its "None" is the last one in the text.
    return rendered.split("None")[0] if cut_at_first_none else rendered.rpartition("None")[0]
