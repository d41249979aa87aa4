"""Prompt formats shared by the dataset statistics (web) and training (worker).

`chat` renders a conversation with the base model's own chat template; `instruction` is the tutorial's
plain layout: "Instruction: ...\\nInput: ...\\nAnswer: " followed by the answer and the EOS token
(the Input line only when the row has an input).
"""

from __future__ import annotations

from typing import Any, Literal

PromptFormat = Literal["chat", "instruction"]
PROMPT_FORMATS: dict[str, str] = {
    "chat": "The model's chat template",
    "instruction": "Tutorial layout (Instruction / Input / Answer)",
}

# The tutorial layout as a chat template, for exported models trained on it (one question, as trained;
# a system prompt is folded into the Input line as instruction_prompt does).
INSTRUCTION_CHAT_TEMPLATE = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') -%}"
    "{%- set system = system | list -%}"
    "{%- set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "Instruction: {{ users[-1]['content'] if users else '' }}\n"
    "{% if system %}Input: system: {{ system[0] }}\n{% endif %}"
    "Answer: "
)


def instruction_prompt(row: dict[str, Any]) -> tuple[str, str]:
    """(prompt, answer) in the tutorial's layout. Non-Alpaca rows use their last user turn before the
    final answer as the instruction and fold any system prompt and earlier turns into the input."""
    messages = row["messages"]
    answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    if "alpaca" in row:
        instruction, input_text = row["alpaca"]["instruction"], row["alpaca"]["input"]
    else:
        head = messages[:-1] if answer else messages
        users = [i for i, m in enumerate(head) if m["role"] == "user"]
        last = users[-1] if users else len(head) - 1
        instruction = head[last]["content"] if head else ""
        context = [f"{m['role']}: {m['content']}" for m in head[:last]]
        input_text = "\n".join(context)
    prompt = f"Instruction: {instruction}\n"
    if input_text.strip():
        prompt += f"Input: {input_text}\n"
    return prompt + "Answer: ", answer
