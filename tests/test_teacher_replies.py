"""Where the teacher's own answer (###Response 4) ends in a contextual-ranking reply: the reply shapes strong chat
models write (GPT-4, Claude, Llama-3-70B-Instruct, Qwen number their steps in different ways), each with the exact
reference answer expected, and replies where it cannot be cut out unambiguously (then there is none)."""
import pytest

import teacher

SHAPES = [
    ("gpt4_parenthesised_steps", """\
(1) The instruction is open-ended: there are many good tips.

(2) ###Response 4: Here are three tips for staying healthy: eat a balanced diet with plenty of fruit and \
vegetables, exercise for at least 30 minutes a day, and sleep seven to nine hours a night.

(3) Responses 1 and 3 are duplicates of each other, so I keep only Response 1.

(4) Response 0: [10]
Response 1: [12]
Response 2: [7]
Response 4: [15]

(5) rank: [4, 1, 0, 2]""", """\
Here are three tips for staying healthy: eat a balanced diet with plenty of fruit and vegetables, exercise for at \
least 30 minutes a day, and sleep seven to nine hours a night."""),

    ("llama3_dot_steps_with_a_numbered_list_inside", """\
1. The instruction is open-ended.

2. ###Response 4:
Here are three tips for staying healthy:
1. Eat a balanced diet rich in fruits and vegetables.
2. Exercise regularly, at least 150 minutes a week.
3. Get seven to nine hours of sleep every night.

3. Responses 0 and 2 are identical; I keep Response 0.

4. Response 0: [11]
Response 1: [9]
Response 3: [6]
Response 4: [15]

5. rank: [4, 0, 1, 3]""", """\
Here are three tips for staying healthy:
1. Eat a balanced diet rich in fruits and vegetables.
2. Exercise regularly, at least 150 minutes a week.
3. Get seven to nine hours of sleep every night."""),

    ("gpt4_bold_step_headings", """\
**Step 1: Open-ended or close-ended?**
The instruction is close-ended: it asks for a single fact.

**Step 2: Reference answer**
###Response 4: The capital of France is Paris.

**Step 3: Duplicates**
Response 0 and Response 2 both say "Paris is the capital." I keep Response 0.

**Step 4: Scores**
- Response 0: [13]
- Response 1: [4]
- Response 3: [9]
- Response 4: [15]

**Step 5: Ranking**
rank: [4, 0, 3, 1]""", "The capital of France is Paris."),

    ("claude_step_colon_with_a_close_paren_list_inside", """\
Step 1: This is an open-ended instruction.

Step 2: ###Response 4:
To stay focused while studying, try the following:
1) Put your phone in another room.
2) Work in 25-minute blocks with short breaks.
3) Keep a glass of water and a snack nearby.

Step 3: No two responses are the same, so all are kept.

Step 4:
Response 0: [9]
Response 1: [12]
Response 2: [5]
Response 3: [10]
Response 4: [14]

Step 5: rank: [4, 1, 3, 0, 2]""", """\
To stay focused while studying, try the following:
1) Put your phone in another room.
2) Work in 25-minute blocks with short breaks.
3) Keep a glass of water and a snack nearby."""),

    ("ordinal_words_as_in_the_authors_prompt", """\
First, the instruction is close-ended, since it has one correct answer.

Second, here is my reference answer:
###Response 4: 17 + 25 = 42.

Third, Responses 1 and 2 are duplicates, so I keep only Response 1.

Fourth, the scores:
Response 0: [15]
Response 1: [6]
Response 3: [3]
Response 4: [15]

Last, the ranking: rank: [0, 4, 1, 3]""", "17 + 25 = 42."),

    ("numbered_markdown_headings_with_sub_headings_and_bullets_inside", """\
### 1. Open-ended or close-ended
Open-ended.

### 2. Reference answer
###Response 4:
#### Benefits of regular exercise
- A better mood, through endorphins.
- A stronger heart and lungs.
- Better sleep.

### 3. Duplicate responses
There are no duplicates.

### 4. Scores
Response 0: [10]
Response 1: [8]
Response 2: [12]
Response 3: [5]
Response 4: [15]

### 5. Ranking
rank: [4, 2, 0, 1, 3]""", """\
#### Benefits of regular exercise
- A better mood, through endorphins.
- A stronger heart and lungs.
- Better sleep."""),

    ("qwen_close_paren_steps_with_a_code_block", """\
1) The instruction is close-ended.
2) ###Response 4:
```python
def add(a, b):
    # 3) no magic here: return the sum
    return a + b
```
3) Responses 0 and 3 are identical; Response 0 is kept.
4) Response 0: [14], Response 1: [8], Response 2: [10], Response 4: [15]
5) rank: [4, 0, 2, 1]""", """\
```python
def add(a, b):
    # 3) no magic here: return the sum
    return a + b
```"""),

    ("bold_step_labels_with_the_answers_own_parenthesised_list", """\
**Step 1:** Close-ended.

**Step 2:** ###Response 4: The three primary colours are (1) red, (2) yellow and (3) blue.

**Step 3:** Response 2 duplicates Response 0; keeping Response 0.

**Step 4:** Response 0: [12] Response 1: [4] Response 3: [9] Response 4: [15]

**Step 5:** rank: [4, 0, 3, 1]""", "The three primary colours are (1) red, (2) yellow and (3) blue."),

    ("unnumbered_markdown_headings_and_a_two_paragraph_answer", """\
## Instruction type
Close-ended.

## Reference answer
###Response 4: Water boils at 100 °C (212 °F) at sea level.

At higher altitudes it boils at a lower temperature.

## Duplicates
None of the responses duplicate each other.

## Scores
Response 0: [12]
Response 1: [10]
Response 2: [3]
Response 3: [11]
Response 4: [15]

## Ranking
rank: [4, 0, 3, 1, 2]""", """\
Water boils at 100 °C (212 °F) at sea level.

At higher altitudes it boils at a lower temperature."""),

    ("bold_labels_with_bold_labels_inside_the_answer", """\
**Type:** Open-ended.

**Reference answer:**
###Response 4:
**Morning:** a short walk in daylight.
**Evening:** ten minutes of stretching, then no screens.

**Duplicates:** Responses 0 and 1 are the same; keeping Response 0.

**Scores:**
Response 0: [9]
Response 2: [11]
Response 3: [6]
Response 4: [15]

**Ranking:** rank: [4, 2, 0, 3]""", """\
**Morning:** a short walk in daylight.
**Evening:** ten minutes of stretching, then no screens."""),

    ("steps_three_and_four_skipped", """\
(1) Open-ended.
(2) ###Response 4: An autumn haiku:
Crisp leaves drift and fall,
the maple lets go of gold,
cold wind counts the loss.
(5) rank: [4, 0, 1]""", """\
An autumn haiku:
Crisp leaves drift and fall,
the maple lets go of gold,
cold wind counts the loss."""),

    ("bold_dot_steps_with_a_bold_step_recipe_inside", """\
**1.** The instruction is open-ended.

**2.** ###Response 4:
**Step 1:** Preheat the oven to 180 °C.
**Step 2:** Mix the flour, sugar and eggs.
**Step 3:** Bake for 30 minutes.

**3.** Duplicates: Responses 1 and 2 are identical.

**4.** Response 0: [9] | Response 1: [11] | Response 3: [7] | Response 4: [15]

**5.** rank: [4, 1, 0, 3]""", """\
**Step 1:** Preheat the oven to 180 °C.
**Step 2:** Mix the flour, sugar and eggs.
**Step 3:** Bake for 30 minutes."""),

    ("dot_steps_with_a_list_longer_than_five_and_a_closing_rule", """\
1. Close-ended.
2. ###Response 4: The planets in order from the Sun:
1. Mercury
2. Venus
3. Earth
4. Mars
5. Jupiter
6. Saturn
7. Uranus
8. Neptune

---
3. No responses duplicate each other.
4. Response 0: [10]; Response 1: [15]; Response 2: [2]; Response 3: [12]; Response 4: [15]
5. rank: [1, 4, 3, 0, 2]""", """\
The planets in order from the Sun:
1. Mercury
2. Venus
3. Earth
4. Mars
5. Jupiter
6. Saturn
7. Uranus
8. Neptune"""),

    ("all_steps_on_one_line",
     "(1) Close-ended. (2) ###Response 4: Paris. (3) No duplicates. (4) Response 0: [15] Response 1: [2] "
     "Response 4: [15] (5) rank: [0, 4, 1]", "Paris."),

    ("the_ranking_right_after_the_answer",
     "###Response 4: Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.\n"
     "rank: [4, 2, 0, 1, 3]", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."),
]

AMBIGUOUS = [
    ("a_two_item_list_then_a_step_three_that_could_be_its_third_item", """\
1. Close-ended.
2. ###Response 4:
1. Mix the flour and water.
2. Knead for ten minutes.
3. Nothing to remove.
4. Response 0: [8]
Response 4: [15]
5. rank: [4, 0]""", "cannot tell where the reference answer ends: 1 place(s) could begin step 3"),
    ("no_step_markers_at_all", """\
The instruction is close-ended.

###Response 4: Paris.

There are no duplicates.

Response 0: [15]
Response 1: [3]

rank: [0, 4, 1]""", "no step markers after the reference answer to tell where it ends"),
    ("no_reference_header", "(1) Close-ended.\n(2) Paris.\n(3) None.\n(5) rank: [0, 1]",
     "no '###Response 4' in the reply"),
]


@pytest.mark.parametrize("reply, reference", [shape[1:] for shape in SHAPES], ids=[shape[0] for shape in SHAPES])
def test_reference_answer_ends_where_the_next_step_begins(reply, reference):
    assert teacher.reference_answer(reply, 4) == (reference, None)
    assert "rank:" not in reference.lower() and teacher.parse_ranking(reply, 4)  # the ranking is read all the same


@pytest.mark.parametrize("reply, problem", [shape[1:] for shape in AMBIGUOUS], ids=[s[0] for s in AMBIGUOUS])
def test_no_reference_when_it_cannot_be_cut_out_unambiguously(reply, problem):
    assert teacher.reference_answer(reply, 4) == (None, problem)
    assert len(teacher.parse_ranking(reply, 4)) >= 2  # the ranking stays usable

