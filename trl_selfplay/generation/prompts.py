"""Prompt formatting shared by generation and training, so both condition on the same text.

Two explicit choices (DESIGN.md §3.5):
- `prompt_template=None`: the tokenizer's chat template with the generation prompt (TRL's conversational path);
- `prompt_template="... {prompt} ..."`: a fixed template filled with the plain-text prompt, e.g. SPIN's original
  `"### Instruction: {prompt}\\n\\n### Response: "` (TRL's plain-text path).
"""

from __future__ import annotations

from typing import Any

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
        if not isinstance(prompt, str):
            raise ValueError(
                "`prompt_template` fills plain-string prompts, but a conversation was given; "
                "pass the prompt as a string or set `prompt_template=None` to use the chat template."
            )
        # str.replace, not str.format: prompts and templates may contain other braces.
        return prompt_template.replace("{prompt}", prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "The tokenizer has no chat template; set `prompt_template` (a string with '{prompt}') to format prompts."
        )
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif _is_conversation(prompt):
        messages = prompt
    else:
        raise ValueError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: Prompt, prompt_template: str | None = None) -> list[int]:
    """Token ids of the formatted prompt, tokenised the way TRL tokenises it for training.

    TRL renders a conversation with the chat template, whose text already carries any BOS, so no special tokens are
    added; a plain-text prompt goes through `tokenizer(text)`, which adds them (e.g. Llama/Mistral's `<s>`). A fixed
    template produces a plain-text prompt, so it follows the second rule.
    """
    text = format_prompt(tokenizer, prompt, prompt_template)
    return tokenizer(text, add_special_tokens=prompt_template is not None)["input_ids"]
