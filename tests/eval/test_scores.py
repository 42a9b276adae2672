"""The evaluation suite's parts that need no model: answer scores against known values, the
prompt templates, the held-out split shared with fine-tuning, and the safety set."""

import pytest
import sacrebleu

from rayllm.eval.config import EvalConfig
from rayllm.eval.prompts import COT_INSTRUCTION, final_answer, question_messages
from rayllm.eval.safety import evaluation_prompts, training_conversations
from rayllm.eval.scores import answer_scores, exact_match, is_refusal, refusal_scores, token_f1
from rayllm.finetune.examples import held_out_split


def test_exact_match_and_f1_follow_squads_normalisation():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    assert token_f1("the big red dog", "a red dog") == pytest.approx(0.8)  # P 2/3, R 2/2
    assert token_f1("nothing alike", "red dog") == 0.0
    scores = answer_scores(["a red dog", "blue sky"], ["red dog", "the blue sea"])
    assert scores["exact_match"] == 0.5
    assert scores["f1"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["a red dog", "blue sky"], [["red dog", "the blue sea"]]).score
    )
    assert 0 < scores["rouge_l"] < 1 and scores["examples"] == 2


def test_refusals_are_told_from_answers():
    assert is_refusal("I can't help with that.")
    assert is_refusal("I'm sorry, but I cannot assist with this request.")
    assert not is_refusal("Use kill -9 with the process id.")
    scores = refusal_scores(
        ["I cannot do that.", "Sure, here it is.", "I won't.", "Press Ctrl-C."],
        [True, True, False, False],
    )
    assert scores == {"refusal_rate": 0.5, "over_refusal_rate": 0.5, "examples": 4}


def test_few_shot_and_chain_of_thought_prompts():
    messages = question_messages("2+3?", [("1+1?", "2")], chain_of_thought=True)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == f"1+1?\n\n{COT_INSTRUCTION}"
    assert messages[1]["content"] == "Answer: 2"
    assert question_messages("2+3?", [], chain_of_thought=False) == [
        {"role": "user", "content": "2+3?"}
    ]
    assert final_answer("2 and 3 make...\nAnswer: 5", chain_of_thought=True) == "5"
    assert final_answer("so it is 5", chain_of_thought=True) == "so it is 5"
    assert final_answer("  5 \n", chain_of_thought=False) == "5"
    assert EvalConfig(shots=3, chain_of_thought=True).result_key("qa") == "qa-3shot-cot"
    assert EvalConfig(shots=3).result_key("safety") == "safety"


def test_the_held_out_split_is_seeded_disjoint_and_shared():
    held, kept = held_out_split(100, 0.05, seed=0)
    assert len(held) == 5 and not set(held) & set(kept) and len(held) + len(kept) == 100
    assert held_out_split(100, 0.05, seed=0) == (held, kept)
    assert held_out_split(100, 0.05, seed=1)[0] != held


def test_the_safety_set_keeps_evaluation_and_training_apart():
    asked = {prompt for prompt, _ in evaluation_prompts()}
    trained = {c[0]["content"] for c in training_conversations()}
    assert not asked & trained
    refused = [c for c in training_conversations() if is_refusal(c[1]["content"])]
    assert len(refused) == len(training_conversations()) // 2  # the rest are plain answers
    must = [refuse for _, refuse in evaluation_prompts()]
    assert must.count(True) == must.count(False) == 12
