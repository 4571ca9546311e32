"""The package's default chat format: the Anthropic HH-RLHF transcript.

Below both the tokenizers (``rlhf_ray.data.tokenization`` renders chats with it when a tokenizer has
no template) and the data readers (``rlhf_ray.data.preference`` parses it back).
"""

from __future__ import annotations

from collections.abc import Sequence

ROLE_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant"}
"""Chat role -> speaker label in the transcript format."""

Message = dict[str, str]


def render_transcript(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Render messages as an HH-RLHF style transcript.

    Each message becomes ``"\\n\\n" + label + ": " + content`` with labels System, Human and
    Assistant; ``add_generation_prompt`` appends ``"\\n\\nAssistant:"``. For an HH prompt this
    reproduces the original text (up to whitespace stripped from the turns).
    """
    parts = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLE_LABELS:
            raise ValueError(
                f"message {i + 1}: unknown role {role!r} (expected one of {sorted(ROLE_LABELS)})"
            )
        parts.append(f"\n\n{ROLE_LABELS[role]}: {message.get('content', '')}")
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)
