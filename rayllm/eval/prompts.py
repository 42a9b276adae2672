"""How a question is put to the model (the paper's utilisation section): zero-shot, few-shot
(in-context demonstrations as earlier turns of the conversation) and chain of thought (the
model is asked to reason first and to give its final answer on a line of its own)."""

from __future__ import annotations

COT_INSTRUCTION = (
    "Think it through step by step, then give your final answer on a last line that starts "
    "with 'Answer:'."
)


def question_messages(
    question: str, demonstrations: list[tuple[str, str]], chain_of_thought: bool
) -> list[dict[str, str]]:
    """The conversation sent for ``question``: each demonstration a user turn and the
    assistant's answer (in the chain-of-thought format when asked), then the question."""
    messages = []
    for asked, answered in demonstrations:
        messages.append({"role": "user", "content": _asked(asked, chain_of_thought)})
        reply = f"Answer: {answered}" if chain_of_thought else answered
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": _asked(question, chain_of_thought)})
    return messages


def _asked(question: str, chain_of_thought: bool) -> str:
    return f"{question}\n\n{COT_INSTRUCTION}" if chain_of_thought else question


def final_answer(text: str, chain_of_thought: bool) -> str:
    """The answer in a generated text: after the last 'Answer:' under chain of thought (its
    last line if there is none), else the whole text."""
    text = text.strip()
    if not chain_of_thought:
        return text
    if "Answer:" in text:
        return text.rsplit("Answer:", 1)[1].strip()
    return text.splitlines()[-1].strip() if text else ""
