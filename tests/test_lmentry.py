"""lmentry.py: LMentry's per-task scoring rules (a table of predictions per task, each core task with a right and
a wrong answer), its accuracy per template and answer position on fixture files written in its schema
(tests/fixtures/eval/lmentry), its LMentry score from the four robustness aspects, and bad files reported."""
import json
import os

import pytest

import lmentry
from conftest import EVAL_FIXTURES as FIXTURES


def example(task, input_text="", **metadata):
    return {"input": input_text, "metadata": {"template_id": 0, **metadata}}


SENT = dict(sentence="The quick fox jumps over logs.")
LMENTRY_CASES = [  # (task, metadata, input, prediction, expected score)
    ("starts_with_letter", dict(letter="e"), "", "elephant", 1), ("starts_with_letter", dict(letter="e"), "", "Elephant.", 1),
    ("starts_with_letter", dict(letter="e"), "", "How about elephant.", 1),
    ("starts_with_letter", dict(letter="e"), "", "dog", 0), ("starts_with_letter", dict(letter="e"), "", "Apple, banana", 0),
    ("ends_with_letter", dict(letter="t"), "", "cat", 1), ("ends_with_letter", dict(letter="t"), "", "The word cat.", 1),
    ("ends_with_letter", dict(letter="t"), "", "dog", 0),
    ("ends_with_letter", dict(letter="t"), "", "cat is a word whose last letter is t", 0),  # the authors' glued pattern
    ("word_containing", dict(letter="z"), "", "pizza", 1), ("word_containing", dict(letter="z"), "", "dog", 0),
    ("word_containing", dict(letter="z"), "", "The answer is pizza", 1),
    ("word_not_containing", dict(letter="e"), 'Write a word without "e":', "dog", 1),
    ("word_not_containing", dict(letter="e"), 'Write a word without "e":', "tree", 0),
    ("word_not_containing", dict(letter="e"), 'Write a word without "e":', 'write a word without "x":', 0),
    ("word_not_containing", dict(letter="e"), 'Write a word without "e":', "a big dog ran", 0),  # no repetitions
    ("sentence_containing", dict(word="dog"), "", "The dog barked.", 1),
    ("sentence_containing", dict(word="dog"), "", "dog", 0), ("sentence_containing", dict(word="dog"), "", "A cat.", 0),
    ("sentence_not_containing", dict(word="dog"), "", "The cat slept.", 1),
    ("sentence_not_containing", dict(word="dog"), "", "My dogs sleep.", 1),  # uncertain, still counted
    ("sentence_not_containing", dict(word="dog"), "", "The dog slept.", 0),
    ("sentence_not_containing", dict(word="dog"), "", "cats", 0),
    ("starts_with_word", dict(word="today"), "", "Today is a sunny day.", 1),
    ("starts_with_word", dict(word="today"), "", "It is sunny today.", 0),
    ("starts_with_word", dict(word="today"), "", "today", 0),
    ("ends_with_word", dict(word="today"), "", "It is sunny today.", 1),
    ("ends_with_word", dict(word="today"), "", "Today it is sunny.", 0),
    ("first_word", dict(SENT, answer="The"), "", "The", 1),
    ("first_word", dict(SENT, answer="The"), "", 'The first word is "The".', 1),
    ("first_word", dict(SENT, answer="The"), "", "quick", 0),
    ("last_word", dict(SENT, answer="logs"), "", "logs", 1), ("last_word", dict(SENT, answer="logs"), "", "over", 0),
    ("first_letter", dict(word="apple", answer="a"), "", "a", 1),
    ("first_letter", dict(word="apple", answer="a"), "", "The first letter of apple is a.", 1),
    ("first_letter", dict(word="apple", answer="a"), "", "p", 0),
    ("last_letter", dict(word="apple", answer="e"), "", "E", 1), ("last_letter", dict(word="apple", answer="e"), "", "l", 0),
    ("word_after", dict(SENT, query="quick", answer="fox"), "", "fox", 1),
    ("word_after", dict(SENT, query="quick", answer="fox"), "", "The word that comes after quick is fox.", 1),
    ("word_after", dict(SENT, query="quick", answer="fox"), "", "quick comes right before fox", 1),  # mirrored
    ("word_after", dict(SENT, query="quick", answer="fox"), "", "jumps", 0),
    ("word_after", dict(SENT, query="quick", answer="fox"), "", "The quick fox jumps over logs.", 0),  # repeats
    ("word_before", dict(SENT, query="fox", answer="quick"), "", "quick", 1),
    ("word_before", dict(SENT, query="fox", answer="quick"), "", "the", 0),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "", "elephant", 1),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "",
     "Elephant has more letters than cat.", 1),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "", "cat has fewer letters", 1),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "", "cat", 0),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "", "Cat is longer.", 0),
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "",
     "elephant has 2 more letters", 0),  # the difference is 5
    ("more_letters", dict(word1="cat", word2="elephant", answer="elephant", distractor="cat"), "",
     "elephant has five more letters than cat", 1),
    ("less_letters", dict(word1="cat", word2="elephant", answer="cat", distractor="elephant"), "", "cat", 1),
    ("less_letters", dict(word1="cat", word2="elephant", answer="cat", distractor="elephant"), "",
     "Cat has fewer letters than elephant.", 1),
    ("less_letters", dict(word1="cat", word2="elephant", answer="cat", distractor="elephant"), "", "elephant", 0),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "87", 1),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "eighty-seven", 1),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "87 is bigger than 12.", 1),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "12 12", 0),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "12", 0),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "12 is smaller than 87", 1),  # mirrored
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "87 < 12", 0),  # a later version said 1
    ("smaller_number", dict(n1=12, n2=87, answer=12, distractor=87), "", "The smaller number is 12.", 1),
    ("smaller_number", dict(n1=12, n2=87, answer=12, distractor=87), "", "87", 0),
    ("first_alphabetically", dict(word1="zebra", word2="apple", answer="apple", distractor="zebra"), "", "apple", 1),
    ("first_alphabetically", dict(word1="zebra", word2="apple", answer="apple", distractor="zebra"), "",
     "Apple comes first alphabetically.", 1),
    ("first_alphabetically", dict(word1="zebra", word2="apple", answer="apple", distractor="zebra"), "", "zebra", 0),
    ("rhyming_word", dict(query="cat", answer="hat", distractor="dog"), "", "hat", 1),
    ("rhyming_word", dict(query="cat", answer="hat", distractor="dog"), "", "Cat rhymes with hat.", 1),
    ("rhyming_word", dict(query="cat", answer="hat", distractor="dog"), "", "I think it is hat", 0),  # whole only
    ("rhyming_word", dict(query="cat", answer="hat", distractor="dog"), "", "dog", 0),
    ("homophones", dict(query="flower", answer="flour", distractor="flavor"), "", "flour", 1),
    ("homophones", dict(query="flower", answer="flour", distractor="flavor"), "", "flower sounds like flour", 1),
    ("homophones", dict(query="flower", answer="flour", distractor="flavor"), "", "flavor", 0),
    ("most_associated_word", dict(category="animals", answer="dog", distractors=["chair", "lamp", "pen", "cup"],
                                  answer_index=2), "", "animals - dog", 1),
    ("most_associated_word", dict(category="animals", answer="dog", distractors=["chair", "lamp", "pen", "cup"],
                                  answer_index=2), "", "The word most associated with animals is dog.", 1),
    ("most_associated_word", dict(category="animals", answer="dog", distractors=["chair", "lamp", "pen", "cup"],
                                  answer_index=2), "", "chair", 0),
    ("least_associated_word", dict(category="animals", answer="chair", distractors=["dog", "cat", "cow", "pig"],
                                   answer_index=0), "", "chair", 1),
    ("least_associated_word", dict(category="animals", answer="chair", distractors=["dog", "cat", "cow", "pig"],
                                   answer_index=0), "", "dog", 0),
    ("any_words_from_category", dict(category="animals", num_words=2, num_distractors=1), "", "Yes", 1),
    ("any_words_from_category", dict(category="animals", num_words=2, num_distractors=1), "", "yes, dog is one", 1),
    ("any_words_from_category", dict(category="animals", num_words=2, num_distractors=1), "", "No.", 0),
    ("all_words_from_category", dict(category="fruit", num_words=2, num_distractors=1), "", "no", 1),
    ("all_words_from_category", dict(category="fruit", num_words=3, num_distractors=0), "",
     "Yes, all of these words are fruits", 1),
    ("all_words_from_category", dict(category="fruit", num_words=2, num_distractors=1), "", "yes", 0),
    ("more_letters_length_diff_1", dict(word1="cats", word2="cat", answer="cats", distractor="cat"), "", "cats", 1),
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "...", 0),  # nothing alphanumeric
    ("bigger_number", dict(n1=12, n2=87, answer=87, distractor=12), "", "Ωé ñó", 0),  # no [a-z0-9] word at all
    ("first_letter", dict(word="apple", answer="a"), "", "a a, a", 1),  # the repetition rule
]


@pytest.mark.parametrize("task,metadata,input_text,prediction,expected", LMENTRY_CASES)
def test_lmentry_scorer_rules(task, metadata, input_text, prediction, expected):
    score, certainty = lmentry.score_prediction(task, prediction, example(task, input_text, **metadata))
    assert (score, certainty in (0, 1)) == (expected, True)


def test_every_core_task_has_a_positive_and_a_negative_case():
    for task in lmentry.CORE_TASKS:
        assert {c[4] for c in LMENTRY_CASES if c[0] == task} == {0, 1}, task


def test_lmentry_certainty_where_the_authors_mark_it():
    score = lambda task, p, **m: lmentry.score_prediction(task, p, example(task, **m))  # noqa: E731
    assert score("sentence_not_containing", "My dogs sleep.", word="dog") == (1, 0)
    assert score("sentence_not_containing", "cats", word="dog") == (0, 0)
    assert score("starts_with_letter", "How about elephant?", letter="e") == (1, 0)  # found inside, not whole
    assert score("rhyming_word", "I think it is hat", query="cat", answer="hat", distractor="dog") == (0, 0)


def test_number_words_match_num2words():
    assert [lmentry.number_words(n) for n in (0, 7, 13, 40, 87, 100, 105, 999, 1000, 1005, 2341)] == [
        "zero", "seven", "thirteen", "forty", "eighty-seven", "one hundred", "one hundred and five",
        "nine hundred and ninety-nine", "one thousand", "one thousand and five",
        "two thousand, three hundred and forty-one"]


def test_lmentry_accuracy_on_fixtures():
    """Fixture files (tests/fixtures/eval/lmentry, written for these tests in LMentry's schema): 3 templates x 2."""
    problems = []
    tasks = lmentry.read_tasks(os.path.join(FIXTURES, "lmentry"), problems.append)
    assert sorted(tasks) == ["any_words_from_category", "bigger_number", "first_letter"]
    assert any("22 of the 25 core LMentry tasks" in p for p in problems)
    outputs = {"first_letter/1": "a", "first_letter/2": "The first letter is r.", "first_letter/3": "t",
               "first_letter/5": "h",  # 4 and 6 missing: wrong
               "bigger_number/1": "87", "bigger_number/2": "45", "bigger_number/3": "sixty-six",
               "bigger_number/4": "91", "bigger_number/5": "250", "bigger_number/6": "8 is bigger than 3"}
    result = lmentry.score_tasks(tasks, outputs, problems.append)
    first, bigger = result["per_task"]["first_letter"], result["per_task"]["bigger_number"]
    assert first["accuracy"] == round(100 * 3 / 6, 2) and first["per_template"] == [100.0, 0.0, 50.0]
    assert bigger["accuracy"] == round(100 * 4 / 6, 2) and bigger["per_template"] == [50.0, 100.0, 50.0]
    # answer_index 0: examples 2, 3, 6 (301, 66, 8 first) -> 2 correct of 3; index 1: 1, 4, 5 -> 2 of 3
    assert bigger["accuracy_by_answer_index"] == [round(200 / 3, 2), round(200 / 3, 2)]
    assert result["per_task"]["any_words_from_category"]["accuracy"] == 0.0
    assert result["accuracy"] == round((50.0 + 66.67 + 0.0) / 3, 2) and result["tasks_scored"] == 3
    assert result["lmentry_score"] is None and len(result["robustness_missing"]) == 22 + 16
    assert len(result["items"]) == 18


def test_lmentry_score_from_its_four_robustness_aspects():
    per_task = {t: {"accuracy": 60.0, "per_template": [50.0, 60.0, 70.0]} for t in lmentry.CORE_TASKS}
    for t in lmentry.ARGUMENT_ORDER_TASKS:
        per_task[t]["accuracy_by_answer_index"] = [50.0, 70.0]
    for t, subsets in lmentry.ARGUMENT_SUBSETS.items():
        for s in subsets:
            per_task[f"{t}_{s}"] = {"accuracy": 60.0, "per_template": [60.0] * 3}
    per_task["first_alphabetically_same_first_letter"]["accuracy"] = 40.0
    per_task["word_after"]["accuracy"] = 50.0  # one adjacent pair (word_after/before) differs by 10
    result = lmentry.lmentry_score(per_task)
    # template 80 (100 - 20), argument order 80, content (80 + 5 x 100) / 6, adjacent (90 + 16 x 100) / 17
    aspects = [80.0, 80.0, (80 + 500) / 6, (90 + 1600) / 17]
    robustness = round(sum(aspects) / 4, 1)
    accuracy = (60.0 * 24 + 50.0) / 25
    assert result["robustness"] == robustness == 89.0
    assert result["lmentry_score"] == round(accuracy * robustness / 100, 1)


def test_lmentry_bad_files_are_reported(tmp_path):
    (tmp_path / "first_word.json").write_text("{broken")
    settings = {"num_examples_per_template": 1, "input_templates": ["{x}"]}
    examples = {"1": {"input": "x"}, "2": {"input": "y", "metadata": {"template_id": 0}}}
    (tmp_path / "last_word.json").write_text(json.dumps({"settings": settings, "examples": examples}))
    problems = []
    tasks = lmentry.read_tasks(str(tmp_path), problems.append)
    assert list(tasks) == ["last_word"] and [i["id"] for i in tasks["last_word"]["items"]] == ["last_word/2"]
    assert any("first_word.json" in p for p in problems)
    assert any("last_word.json" in p and "example 1" in p for p in problems)
    result = lmentry.score_tasks(tasks, {"last_word/2": "logs"}, problems.append)  # metadata without "answer": reported
    assert any("last_word/2" in p and "cannot score" in p for p in problems) and result["items"] == []


@pytest.mark.parametrize("field, value, named", [
    ("input_templates", 3, "'input_templates' is not a non-empty list"),
    ("input_templates", [], "'input_templates' is not a non-empty list"),
    ("num_examples_per_template", True, "'num_examples_per_template' is not a positive integer"),
    ("num_examples_per_template", 0, "'num_examples_per_template' is not a positive integer"),
    ("examples", ["x"], "'examples' is not an object"),
])
def test_lmentry_malformed_task_fields_are_reported_by_name(tmp_path, field, value, named):
    """A field of the wrong type is one reported line naming it, not an exception while scoring."""
    content = {"settings": {"num_examples_per_template": 1, "input_templates": ["{x}"]},
               "examples": {"1": {"input": "x", "metadata": {"template_id": 0}}}}
    if field == "examples":
        content["examples"] = value
    else:
        content["settings"][field] = value
    (tmp_path / "last_word.json").write_text(json.dumps(content))
    problems = []
    tasks = lmentry.read_tasks(str(tmp_path), problems.append)
    assert tasks == {}
    assert [p for p in problems if "last_word.json" in p] == [
        f"{tmp_path / 'last_word.json'}: not an LMentry task file (ValueError: {named})"]
    assert lmentry.score_tasks(tasks, {}, problems.append)["tasks_scored"] == 0


def test_lmentry_a_bool_is_neither_a_template_id_nor_an_answer_position(tmp_path):
    """True == 1 in Python; LMentry's files hold integers, so a bool template_id is refused and a bool
    answer_index is not counted as position 1."""
    settings = {"num_examples_per_template": 2, "input_templates": ["{x}", "{y}"]}
    metadata = {"answer": "logs", "answer_index": True}
    examples = {"1": {"input": "a", "metadata": {"template_id": True, **metadata}},
                "2": {"input": "b", "metadata": {"template_id": 1, **metadata}}}
    (tmp_path / "last_word.json").write_text(json.dumps({"settings": settings, "examples": examples}))
    problems = []
    tasks = lmentry.read_tasks(str(tmp_path), problems.append)
    assert [i["id"] for i in tasks["last_word"]["items"]] == ["last_word/2"]
    assert any("example 1" in p for p in problems)
    result = lmentry.score_tasks(tasks, {"last_word/2": "logs"}, problems.append)
    assert result["per_task"]["last_word"]["per_template"] == [0.0, 50.0]
    assert "accuracy_by_answer_index" not in result["per_task"]["last_word"]


def test_bigger_number_is_lmentry_v1_the_mirror_of_smaller_number():
    """LMentry v1 (lmentry/scorers at commit 463763d): smaller_number "was created by simply mirroring
    BiggerNumberScorer", whose four phrasings it mirrors; a later bigger_number added "<", ">" and more, and
    mirrored those into "9 < 5" for 9. Both tasks now score every phrasing alike, mirrored."""
    bigger = dict(n1=5, n2=9, answer=9, distractor=5)
    smaller = dict(n1=5, n2=9, answer=5, distractor=9)
    pairs = [("9 is bigger", "5 is smaller"), ("9 is larger than 5", "5 is smaller than 9"),
             ("9 is the bigger number", "5 is the smaller number"),
             ("The larger number is 9.", "The smaller number is 5."), ("5 is smaller than 9", "9 is bigger than 5"),
             ("Of the numbers 5 and 9, 9 is bigger", "Of the numbers 5 and 9, 5 is smaller"),
             ("9 > 5", "5 < 9"), ("5 < 9", "9 > 5"), ("9 < 5", "5 > 9"), ("The bigger is 9", "The smaller is 5"),
             ("The number that is bigger than 5 is 9.", "The number that is smaller than 9 is 5.")]
    scores = [(lmentry.score_prediction("bigger_number", b, example("bigger_number", **bigger))[0],
               lmentry.score_prediction("smaller_number", s, example("smaller_number", **smaller))[0])
              for b, s in pairs]
    assert scores == [(1, 1)] * 6 + [(0, 0)] * 5
