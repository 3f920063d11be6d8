"""Pairwise judging in both orders, single-answer scores, and reading what judges reply."""

import re

import pytest

from tuneforge.evaluation.judging import (
    PAIRWISE_SYSTEM_PROMPT,
    combine_orders,
    item_conversation,
    item_question,
    pairwise,
    parse_score,
    parse_verdict,
    single,
)

ITEMS = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
         for i in range(8)]
GOOD = [f"GOOD {2 * i}" for i in range(8)]
BAD = [f"bad {2 * i + 1}" for i in range(8)]


class ScriptedJudge:
    """A judge whose reply is a function of the conversation; it records every conversation it saw."""

    def __init__(self, reply):
        self.reply, self.seen, self.calls = reply, [], []

    def complete(self, conversations, *, max_tokens, temperature, seed):
        self.calls.append({"n": len(conversations), "max_tokens": max_tokens, "temperature": temperature, "seed": seed})
        self.seen.extend(conversations)
        return [self.reply(c) for c in conversations]


def shown(conversation):
    """(answer shown as A, answer shown as B) in a pairwise conversation."""
    text = conversation[-1]["content"]
    first = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    second = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    return first, second


def prefers_good(conversation):
    first, _ = shown(conversation)
    return f"Both are short, but one is right. [[{'A' if first.startswith('GOOD') else 'B'}]]"


def test_a_judge_that_always_prefers_the_first_position_decides_nothing():
    judge = ScriptedJudge(lambda c: "Assistant A is more detailed.\n\n[[A]]")
    report = pairwise(judge, ITEMS, GOOD, BAD, rubric="Correct arithmetic wins.")
    # Each pair was shown both ways round, in one call to the judge.
    assert judge.calls == [{"n": 16, "max_tokens": 512, "temperature": 0.0, "seed": None}]
    for i in range(8):
        assert shown(judge.seen[2 * i]) == (GOOD[i], BAD[i]) and shown(judge.seen[2 * i + 1]) == (BAD[i], GOOD[i])
    assert all(j.a_first == "a" and j.b_first == "b" and j.verdict == "tie" for j in report.judgements)
    assert (report.outcome.wins, report.outcome.ties, report.outcome.losses) == (0, 8, 0)
    assert report.self_agreement.estimate == 0.0 and report.self_agreement.n == 8
    assert report.first_position.estimate == 1.0  # the bias is measured, not hidden
    assert report.score.estimate == 0.5
    assert report.unparseable_replies == 0

    strict = pairwise(ScriptedJudge(lambda c: "[[A]]"), ITEMS, GOOD, BAD, disagreement="inconsistent")
    assert strict.inconsistent_pairs == 8 and strict.outcome.n == 0
    assert strict.to_dict()["outcome"]["win_rate"]["estimate"] is None


def test_a_judge_that_prefers_one_answer_gives_wins_and_full_agreement():
    report = pairwise(ScriptedJudge(prefers_good), ITEMS, GOOD, BAD, labels=("fine-tuned", "base"))
    assert [j.verdict for j in report.judgements] == ["a"] * 8
    assert (report.outcome.wins, report.outcome.ties, report.outcome.losses) == (8, 0, 0)
    assert report.outcome.win.estimate == 1.0 and report.outcome.win.low == pytest.approx(0.6756, abs=1e-4)
    assert report.self_agreement.estimate == 1.0
    assert report.first_position.estimate == 0.5
    assert report.score.estimate == 1.0
    # And the other way round: answers_b is the good one.
    reverse = pairwise(ScriptedJudge(prefers_good), ITEMS, BAD, GOOD)
    assert (reverse.outcome.wins, reverse.outcome.losses) == (0, 8)
    data = report.to_dict()
    assert data["labels"] == ["fine-tuned", "base"] and data["outcome"]["wins"] == 8 and len(data["judgements"]) == 8


def test_unreadable_replies_are_counted_not_dropped():
    def sometimes_rambles(conversation):
        first, _ = shown(conversation)
        if first in (GOOD[0], BAD[1]):  # pair 0 in its first order, pair 1 in its second
            return "Hmm, both have merits and I could not say."
        return prefers_good(conversation)

    report = pairwise(ScriptedJudge(sometimes_rambles), ITEMS, GOOD, BAD)
    assert report.unparseable_replies == 2 and report.unparsed_pairs == 2
    assert [j.verdict for j in report.judgements[:2]] == ["unparsed", "unparsed"]
    assert report.judgements[0].a_first is None and report.judgements[0].b_first == "a"
    assert report.outcome.n == 6 and report.outcome.wins == 6  # the rates are over the pairs with a verdict
    assert report.self_agreement.n == 6


def test_the_rubric_and_the_default_prompt_reach_the_judge():
    judge = ScriptedJudge(lambda c: "[[C]]")
    report = pairwise(judge, ITEMS[:1], GOOD[:1], BAD[:1], rubric="Answers must be a bare number.", max_tokens=64,
                      temperature=0.3, seed=11)
    system, user = judge.seen[0]
    assert system["role"] == "system" and system["content"].startswith(PAIRWISE_SYSTEM_PROMPT)
    assert system["content"].endswith("Answers must be a bare number.")
    assert user["content"].startswith("[User Question]\nWhat is 0 + 0?\n\n")
    assert "0" not in user["content"].split("[User Question]")[0]  # the reference answer is not shown
    assert judge.calls[0] == {"n": 2, "max_tokens": 64, "temperature": 0.3, "seed": 11}
    assert report.judgements[0].verdict == "tie" and report.self_agreement.estimate == 1.0


def test_combining_the_two_orders():
    assert combine_orders("a", "a", "tie") == "a"
    assert combine_orders("tie", "tie", "tie") == "tie"
    assert combine_orders("a", "tie", "tie") == "tie"  # a win in one order only is no win
    assert combine_orders("a", "b", "inconsistent") == "inconsistent"
    assert combine_orders(None, "a", "tie") == "unparsed"


@pytest.mark.parametrize("reply, expected", [
    ("[[A]]", "A"),
    ("Assistant B explains the steps. My final verdict is: [[B]]", "B"),
    ("Both are equally good. [[C]]", "tie"),
    ("[[tie]]", "tie"),
    ('Output "[[A]]" if A is better... After comparing, [[B]]', "B"),  # the last bracketed verdict counts
    ("A", "A"),
    ("**B**", "B"),
    ("Assistant A.", "A"),
    ("tie", "tie"),
    ("Verdict: B", "B"),
    ("Final verdict: tie", "tie"),
    ("The better answer is A, because it is right.", "A"),
    ("Both are fine.", None),
    ("Assistant A's answer is Better than nothing", None),
    ("", None),
    ("I cannot decide between them.", None),
])
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Clear and correct. Rating: [[8]]", 8.0),
    ("[[7.5]]", 7.5),
    ("Rating: 6", 6.0),
    ("score = 3", 3.0),
    ("9/10", 9.0),
    ("4", 4.0),
    ("[[11]]", None),  # off the 1-10 scale
    ("It is a 5 out of 10 kind of answer, roughly", None),
    ("", None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply, (1, 10)) == expected


def test_single_answer_scores_with_a_bootstrap_interval():
    scores = {"GOOD": "Correct. Rating: [[9]]", "bad": "Wrong. Rating: [[2]]"}
    judge = ScriptedJudge(lambda c: scores[c[-1]["content"].split("[The Start of Assistant's Answer]\n")[1].split()[0]])
    answers = GOOD[:6] + BAD[:2]
    report = single(judge, ITEMS, answers, rubric="Exact arithmetic.", scale=(1, 10), seed=0)
    assert report.scores == [9.0] * 6 + [2.0] * 2
    assert report.mean.estimate == pytest.approx((6 * 9 + 2 * 2) / 8)
    assert report.mean.low < report.mean.estimate < report.mean.high
    assert "scale of 1 to 10" in judge.seen[0][0]["content"] and judge.seen[0][0]["content"].endswith("Exact arithmetic.")

    rambling = single(ScriptedJudge(lambda c: "no idea"), ITEMS[:3], GOOD[:3], rubric=None)
    assert rambling.unparseable_replies == 3 and rambling.mean.n == 0 and rambling.to_dict()["mean"]["estimate"] is None


def test_answers_must_match_the_items():
    with pytest.raises(ValueError, match="answers_b has 7 answers for 8 items"):
        pairwise(ScriptedJudge(prefers_good), ITEMS, GOOD, BAD[:7])


def test_items_in_every_dataset_shape():
    assert item_question("plain prompt") == "plain prompt"
    assert item_question({"prompt": "p", "completion": "c"}) == "p"
    assert item_question({"instruction": "Sum these", "input": "1 2", "output": "3"}) == "Sum these\n\n1 2"
    assert item_question({"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": []}) == "hi"
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum 1 2"},
                         {"role": "assistant", "content": "3"}]}
    assert item_conversation(chat) == chat["messages"][:4]  # everything before the answer being judged
    assert item_question(chat) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Sum 1 2"
    with pytest.raises(ValueError, match="needs messages, prompt, question"):
        item_question({"text": "x"})


def test_a_real_local_judge_of_noise_is_all_unparseable(tiny_model_dir):
    """The whole path on a tiny untrained model: every reply is read, none is a verdict, and the report says so."""
    from tuneforge.evaluation.judges import judge_for

    report = pairwise(judge_for(str(tiny_model_dir)), ITEMS[:3], GOOD[:3], BAD[:3], max_tokens=4)
    assert len(report.judgements) == 3 and all(len(j.replies) == 2 for j in report.judgements)
    assert report.unparseable_replies == 6 and report.unparsed_pairs == 3 and report.outcome.n == 0
