"""The paper's evaluation (paper, Table 1): Super-NaturalInstructions (ROUGE-L), LMentry
(its own scorers, in lmentry.py) and Vicuna QA (a pairwise LLM judge), one table with a
row per model.

    python eval.py --checkpoints alpaca=runs/sft tuna=runs/tuna --tokenizer tokenizer.model \
        --superni BENCH/superni --lmentry BENCH/lmentry/data --vicuna BENCH/vicuna \
        --judge-url http://127.0.0.1:8000/v1 --judge-model gpt-4 --out runs/eval

Writes OUT/results.md (rows = models, columns = benchmarks, like the paper's Table 1) and
OUT/results.json (every per-item output kept). Answers are greedy, batched, and appended
to OUT/generations/MODEL/BENCH.jsonl as they finish, each with what made it (checkpoint,
tokenizer, prompt, max_new_tokens), so a killed run resumes without regenerating and
another checkpoint under the same name never reuses them; judge replies are cached by
client.TeacherClient (OUT/judge_cache.jsonl). Bad input is reported by file and item,
skipped, and listed under "Skipped". One evaluation at a time writes OUT (OUT.lock).
A model given with --served NAME=MODEL@URL answers through an OpenAI-compatible server
(vLLM, server.py) instead of a model loaded here: the same prompts, greedy, the same
max_new_tokens and stop ids, kept the same way and keyed by the server's model name too.

Prompts: every benchmark is asked in the Alpaca template the models were tuned on
(data.alpaca_prompt); the benchmarks themselves are silent on that wrapping (Tk-Instruct's
src/ni_collator.py; LMentry's data files), so it is this project's choice.
"""
import argparse
import functools
import hashlib
import json
import os
import string
import sys
import threading
from itertools import combinations

import torch

import checkpoint
import data
import lmentry
import model
import teacher
from client import RunError, TeacherClient, TeacherError, get_field
from tokenizer import Tokenizer

# ---- 1. files and problems

class EvalError(ValueError):
    """Input the evaluation cannot start with (a missing folder or file); the message names it."""


# every skipped file / item / reply, in words; ends up in results.md and results.json
PROBLEMS = []


def problem(message):
    PROBLEMS.append(message)
    print(f"eval: skipped: {message}", file=sys.stderr)


def read_jsonl(path):
    """The JSON objects of a JSONL file; a malformed line (e.g. cut short by a kill) is reported."""
    return [record for _, record in data.read_jsonl_log(path, problem)]


# ---- 2. Super-NaturalInstructions
# Tk-Instruct's per-category metric (src/compute_metrics.py);
# the headline number is ROUGE-L over all tasks.
EXACT_MATCH_CATEGORIES = {
    "textual_entailment",
    "cause_effect_classification",
    "coreference_resolution",
    "dialogue_act_recognition",
    "answerability_classification",
    "word_analogy",
}


def with_period(text):
    """Tk-Instruct's rule for the definition and the input: strip, end in punctuation (else add '.')."""
    text = text.strip()
    return text if text and text[-1] in string.punctuation else text + "."


def superni_prompt(definition, instance_input):
    """Zero-shot "definition only" (Tk-Instruct src/ni_collator.py, DataCollatorForNI)
    inside the Alpaca template: the definition is the instruction and the instance input
    the Alpaca input, both with Tk-Instruct's add-a-period rule. Tk-Instruct writes
    "Definition: D\\n\\nNow complete the following example -\\nInput: X\\nOutput: "; the
    template's "### Instruction:", "### Input:" and "### Response:" take the places of
    those three labels."""
    return data.alpaca_prompt(with_period(definition), with_period(instance_input))


def superni_split(superni_dir):
    """The test split's task list: test_tasks.txt, else splits/default/test_tasks.txt."""
    split = os.path.join(superni_dir, "test_tasks.txt")
    if not os.path.exists(split):
        split = os.path.join(superni_dir, "splits", "default", "test_tasks.txt")
    if not os.path.isfile(split):
        raise EvalError(f"--superni {superni_dir}: neither test_tasks.txt "
                        "nor splits/default/test_tasks.txt found there")
    return split


def read_superni(superni_dir, max_instances=100):
    """Items of the English test split: the first `max_instances` instances of each task
    (Super-NI eval/leaderboard/create_reference_file.py). superni_dir holds test_tasks.txt
    (or splits/default/test_tasks.txt) and tasks/<name>.json."""
    split = superni_split(superni_dir)
    with open(split, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    items = []
    missing = []
    for name in names:
        path = os.path.join(superni_dir, "tasks", name + ".json")
        if not os.path.exists(path):
            missing.append(name)
            continue
        items += superni_task_items(path, name, max_instances)
    if missing:
        first_missing = ", ".join(missing[:3])
        problem(f"{split}: {len(missing)} of {len(names)} tasks "
                f"have no file in {superni_dir}/tasks (first: {first_missing})")
    return items


def superni_task_items(path, name, max_instances):
    """The items of one task file; a malformed task or instance is reported and skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
    except json.JSONDecodeError as e:
        problem(f"{path}: not valid JSON ({e})")
        return []
    definition = task.get("Definition")
    if isinstance(definition, list) and definition:
        definition = definition[0]
    instances = task.get("Instances")
    if not isinstance(definition, str) or not instances or not task.get("Categories"):
        problem(f"{path}: task has no Definition, Categories or Instances")
        return []
    # the official script's group name
    category = "_".join(task["Categories"][0].lower().split())
    items = []
    for index, inst in enumerate(instances[:max_instances]):
        if not valid_instance(inst):
            inst_id = inst.get("id", index) if isinstance(inst, dict) else index
            problem(f"{path}: instance {inst_id}: "
                    "no 'input', or an empty or malformed reference list 'output'")
            continue
        items.append({"id": inst.get("id", f"{name}-{index}"),
                      "task": name,
                      "category": category,
                      "prompt": superni_prompt(definition, inst["input"]),
                      "references": inst["output"]})
    return items


def valid_instance(inst):
    """An instance with a string 'input' and a non-empty list of string references 'output'."""
    if not isinstance(inst, dict):
        return False
    refs = inst.get("output")
    refs_valid = isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)
    return bool(refs_valid) and isinstance(inst.get("input"), str)


def normalize_answer(text):
    """The official script's exact-match normalisation: lowercase, drop
    string.punctuation, collapse whitespace (SQuAD's rule without removing articles)."""
    punctuation = set(string.punctuation)
    text = "".join(ch for ch in text.lower() if ch not in punctuation)
    return " ".join(text.split())


def exact_match(prediction, reference):
    return float(normalize_answer(prediction) == normalize_answer(reference))


_ROUGE_SCORER = []


def rouge_l(prediction, reference):
    """ROUGE-L F of one pair, as the official script: rouge_score's
    RougeScorer(['rougeL'], use_stemmer=True), default tokenizer, reference as target."""
    if not _ROUGE_SCORER:
        # the one runtime exception (requirements.txt), only here
        from rouge_score import rouge_scorer
        _ROUGE_SCORER.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    scores = _ROUGE_SCORER[0].score(target=reference, prediction=prediction)
    return scores["rougeL"].fmeasure


def max_over_references(metric, prediction, references):
    """A prediction's score against several references: the best one (the official
    script's metric_max_over_ground_truths)."""
    return max(metric(prediction, r) for r in references)


def superni_metrics(predictions, references):
    """{"exact_match", "rougeL"}: each the max over references, pooled, x100, rounded to 4 decimals."""
    pairs = list(zip(predictions, references))
    em = sum(max_over_references(exact_match, p, refs) for p, refs in pairs)
    rl = sum(max_over_references(rouge_l, p, refs) for p, refs in pairs)
    n = max(len(references), 1)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rl / n, 4)}


def pooled_metrics(rows):
    """superni_metrics' numbers, from the per-item scores of `rows`."""
    n = max(len(rows), 1)
    metrics = ("exact_match", "rougeL")
    return {m: round(100.0 * sum(row[m] for row in rows) / n, 4) for m in metrics}


def pooled_by(rows, key):
    """pooled_metrics of each group of rows that share a value of `key` (a task, a category)."""
    groups = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return {name: pooled_metrics(group) for name, group in groups.items()}


def score_superni(items, outputs):
    """Per-item scores, overall, per-task and per-category metrics; a missing output scores as ""."""
    rows = []
    for item in items:
        prediction = outputs.get(item["id"], "")
        refs = item["references"]
        row = {k: v for k, v in item.items() if k != "prompt"}
        row["prediction"] = prediction
        row["exact_match"] = max_over_references(exact_match, prediction, refs)
        row["rougeL"] = max_over_references(rouge_l, prediction, refs)
        rows.append(row)
    per_category = pooled_by(rows, "category")
    for name, metrics in per_category.items():
        metrics["metric"] = "exact_match" if name in EXACT_MATCH_CATEGORIES else "rougeL"
    return {"overall": pooled_metrics(rows),
            "per_task": pooled_by(rows, "task"),
            "per_category": per_category,
            "items": rows}


# ---- 3. Vicuna QA
# FastChat llm_judge "pair-v2" / "pair-math-v1" structure (data/judge_prompts.jsonl),
# in this project's words.
JUDGE_SYSTEM = (
    "You are an impartial judge. "
    "You will see a user's question and the answers two AI assistants gave to it. "
    "Decide which assistant follows the user's instructions and answers the question better. "
    "{criteria} "
    "First compare the two answers and explain your comparison briefly. "
    "The order in which the answers appear, their length and the assistants' names "
    "must not sway you; be as objective as you can. "
    "After the explanation, give your verdict in exactly this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.')
JUDGE_CRITERIA = {
    "general": "Weigh helpfulness, relevance, accuracy, depth, creativity and level of detail.",
    "reference": "Weigh correctness and helpfulness. "
                 "A reference answer is given: "
                 "compare both answers with it, and identify and correct any mistakes in them."}
# FastChat's categories judged with a reference
REFERENCE_CATEGORIES = {"math", "reasoning", "coding"}


def quoted_block(title, text):
    return f"[The Start of {title}]\n{text}\n[The End of {title}]"


def judge_messages(question, answer_a, answer_b, reference=None):
    blocks = [f"[User Question]\n{question}"]
    if reference is not None:
        blocks.append(quoted_block("Reference Answer", reference))
    for name, text in (("A", answer_a), ("B", answer_b)):
        blocks.append(quoted_block(f"Assistant {name}'s Answer", text))
    criteria = JUDGE_CRITERIA["general" if reference is None else "reference"]
    system = JUDGE_SYSTEM.format(criteria=criteria)
    return [{"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join(blocks)}]


def parse_verdict(reply):
    """"A", "B", "tie" or "error": FastChat's substring tests in its order
    ([[A]], then [[B]], then [[C]])."""
    marks = (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie"))
    for mark, verdict in marks:
        if mark in reply:
            return verdict
    return "error"


def combine_games(game1, game2):
    """Model 1's result from game 1 (model 1 shown as A) and game 2 (shown as B): a win or
    a loss only when both orders agree; a tie when game 1 says tie or they disagree;
    "error" if either named no winner."""
    if "error" in (game1, game2):
        return "error"
    winner1 = {"A": 1, "B": 2}.get(game1, "tie")
    winner2 = {"A": 2, "B": 1}.get(game2, "tie")
    if winner1 == "tie" or winner1 != winner2:
        return "tie"
    return "win" if winner1 == 1 else "lose"


def read_vicuna(vicuna_dir):
    """Questions (question.jsonl: question_id, category, turns; the old `text` field too)
    and the GPT-4 reference answers by question id (reference_answer_gpt-4.jsonl or
    reference_answer/gpt-4.jsonl)."""
    path = os.path.join(vicuna_dir, "question.jsonl")
    if not os.path.isfile(path):
        raise EvalError(f"--vicuna {vicuna_dir}: no question.jsonl there")
    return read_questions(path), read_references(vicuna_dir)


def read_questions(path):
    """The questions of question.jsonl, each with its prompt; a malformed record is reported."""
    questions = []
    for i, record in enumerate(read_jsonl(path), 1):
        record = record if isinstance(record, dict) else {}
        old_text = record.get("text")
        turns = record.get("turns") or ([old_text] if isinstance(old_text, str) else None)
        turns_valid = isinstance(turns, list) and isinstance(turns[0], str)
        if "question_id" not in record or not turns_valid:
            problem(f"{path}: record {i}: needs 'question_id' and 'turns' (or 'text')")
            continue
        question = turns[0]
        questions.append({"id": str(record["question_id"]),
                          "category": record.get("category", ""),
                          "question": question,
                          "prompt": data.alpaca_prompt(question)})
    return questions


# the two layouts of the reference answers: a flat file, and FastChat's folder
REFERENCE_FILES = ("reference_answer_gpt-4.jsonl", os.path.join("reference_answer", "gpt-4.jsonl"))


def read_references(vicuna_dir):
    """The GPT-4 reference answers by question id, from whichever layout the folder
    holds; both at once is refused (one would silently override the other). A malformed
    record is reported."""
    paths = [os.path.join(vicuna_dir, name) for name in REFERENCE_FILES]
    present = [path for path in paths if os.path.exists(path)]
    if len(present) > 1:
        raise EvalError(f"--vicuna {vicuna_dir}: both {present[0]} and {present[1]} exist; "
                        "keep one")
    references = {}
    for ref_path in present:
        for record in read_jsonl(ref_path):
            try:
                answer = record["choices"][0]["turns"][0]
                references[str(record["question_id"])] = answer
            except (KeyError, IndexError, TypeError):
                shown = str(record)[:60]
                problem(f"{ref_path}: record {shown}: no question_id or choices[0].turns[0]")
    return references


JUDGE_MAX_TOKENS = 2048  # FastChat's judge


def judge_request(messages):
    """(path, params) of one judgment: greedy, as FastChat's judge (the run and its dry run)."""
    params = dict(messages=messages, temperature=0, max_tokens=JUDGE_MAX_TOKENS)
    return "/chat/completions", params


def judge_jobs(questions, references, pairs):
    """(model 1, model 2, question, order, reference or None) of every judgment: both
    orders of every question for each pair."""
    jobs = []
    for m1, m2 in pairs:
        for q in questions:
            needs_reference = q["category"] in REFERENCE_CATEGORIES
            reference = references.get(q["id"]) if needs_reference else None
            jobs += [(m1, m2, q, order, reference) for order in (0, 1)]
    return jobs


def shown_order(m1, m2, order):
    """The two models in the order the judge sees them: model 1 as A in order 0, as B in 1."""
    return (m1, m2) if order == 0 else (m2, m1)


def judge_one(client, answers, job):
    """(the judge's reply, its verdict) of one job; a failed request is a reply with no verdict."""
    m1, m2, q, order, reference = job
    first, second = shown_order(m1, m2, order)
    answer_a = answers[first].get(q["id"], "")
    answer_b = answers[second].get(q["id"], "")
    messages = judge_messages(q["question"], answer_a, answer_b, reference)
    try:
        response = client.request(*judge_request(messages))
        reply = str(response["choices"][0]["message"]["content"])
    # no request reaches the judge: stop, the answers are kept for the next run
    except RunError:
        raise
    except Exception as e:  # a failed request or odd answer: a reply, no verdict
        reply = f"<request failed: {type(e).__name__}: {e}>"
    return reply, parse_verdict(reply)


def judgment_record(job, reply1, reply2):
    """One question judged for one pair: both games' verdicts and replies, and model 1's
    result; a result with no verdict is reported."""
    m1, m2, q, _, _ = job
    text1, game1 = reply1
    text2, game2 = reply2
    outcome = combine_games(game1, game2)
    if outcome == "error":
        bad = "game 1" if game1 == "error" else "game 2"
        bad_reply = text1 if game1 == "error" else text2
        problem(f"Vicuna question {q['id']}, {m1} vs {m2}: "
                f"judge reply of {bad} names no verdict ([[A]]/[[B]]/[[C]]); "
                f"not counted: {bad_reply[:80]!r}")
    return {"question_id": q["id"],
            "category": q["category"],
            "model_1": m1,
            "model_2": m2,
            "g1_verdict": game1,
            "g2_verdict": game2,
            "g1_judgment": text1,
            "g2_judgment": text2,
            "result_for_model_1": outcome}


def add_win_rates(counts):
    """A pair's win rate (wins / games with a verdict) and adjusted win rate (a tie counts
    half a win); None where no game has a verdict."""
    total = counts["win"] + counts["lose"] + counts["tie"]
    if not total:
        counts["win_rate"] = None
        counts["adjusted_win_rate"] = None
        return
    counts["win_rate"] = round(counts["win"] / total, 4)
    counts["adjusted_win_rate"] = round((counts["win"] + 0.5 * counts["tie"]) / total, 4)


def judge_vicuna(client, questions, references, answers, pairs):
    """Both orders of every question for each (model_1, model_2) pair; per-pair
    win/lose/tie from model 1's side, win rates, and every judgment kept (prompts,
    replies, verdicts)."""
    jobs = judge_jobs(questions, references, pairs)

    def ask(job):
        return judge_one(client, answers, job)

    replies = client.map(ask, jobs, "judge calls", failed=lambda reply: reply[1] == "error")
    results = {}
    judgments = []
    for k in range(0, len(jobs), 2):
        m1, m2, _, _, _ = jobs[k]
        record = judgment_record(jobs[k], replies[k], replies[k + 1])
        judgments.append(record)
        tally = {"model_1": m1, "model_2": m2, "win": 0, "lose": 0, "tie": 0, "error": 0}
        counts = results.setdefault(f"{m1} vs {m2}", tally)
        counts[record["result_for_model_1"]] += 1
    for counts in results.values():
        add_win_rates(counts)
    return {"pairs": results, "judgments": judgments}


# ---- 4. generation, resumable
def answer_producer(directory, tokenizer_path=None, served_model=None):
    """What makes a checkpoint's answers (teacher.producer_identity), found without loading
    the model; served_model: the name a server answers for it under (--served), else None."""
    tok = Tokenizer(tokenizer_path or directory)
    identity = teacher.producer_identity(directory, tok.path)
    if served_model is None:
        return {**identity, "stop_ids": tok.stop_ids}
    return {**identity, "stop_ids": tok.stop_ids, "served_model": served_model}


# Answers generated together where --batch-size is "auto" and the device reports no free
# memory (a CPU)
EVAL_BATCH_ROWS = 8


def generate_answers(name, bench, items, get_model, out_dir, batch_size, max_new_tokens, producer):
    """{item id: answer} with greedy decoding; finished answers are appended to
    OUT/generations/NAME/BENCH.jsonl after every batch and never generated again. Each
    line records what made it ("made_by": a digest of the producer (answer_producer), the
    decoding settings and the item's prompt): an answer made by another checkpoint,
    tokenizer, prompt or max_new_tokens is generated again, never reused (the old line
    stays in the file, ignored). One process at a time writes the file (data.lock_output)."""
    path = answers_path(out_dir, name, bench)
    with data.lock_output(path):
        return _generate_answers(name, bench, items, get_model, path,
                                 batch_size, max_new_tokens, producer)


def cut_prompt(prefix, text_ids, limit):
    """A prompt's ids, at most `limit` of them: the ids the tokenizer puts before a text
    (Tokenizer.prefix_ids: BOS, or nothing) whole, then the text's last tokens, so a long
    prompt still ends in "### Response:"."""
    kept = max(0, limit - len(prefix))
    return prefix + text_ids[max(0, len(text_ids) - kept):]


def answers_path(out_dir, name, bench):
    return os.path.join(out_dir, "generations", name, bench + ".jsonl")


def answer_key(item, max_new_tokens, producer):
    """What made an answer: a digest of the producer, the decoding settings and the item's prompt."""
    decoding = {"decoding": "greedy", "max_new_tokens": max_new_tokens}
    made_of = json.dumps([producer, decoding, item["prompt"]], sort_keys=True)
    return hashlib.sha256(made_of.encode()).hexdigest()[:24]


def answer_made_by(line):
    """The key a kept answer was made under (None: the line holds no answer)."""
    return line.get("made_by") if isinstance(line.get("output"), str) else None


def answer_log(path, items, max_new_tokens, producer):
    """(the answers' data.KeptLog, {item id: its key "made_by"}, {item id: its kept answer})."""
    made = {item["id"]: answer_key(item, max_new_tokens, producer) for item in items}
    kept = data.KeptLog(path, made, answer_made_by, problem)
    done = {item_id: line["output"] for item_id, line in kept.kept.items()}
    return kept, made, done


def encode_prompts(tok, items, limit, bench):
    """Each item's prompt ids, cut to `limit` tokens (cut_prompt); a cut prompt is reported."""
    prefix = tok.prefix_ids()
    encoded = []
    for item in items:
        text_ids = tok.encode(item["prompt"])
        length = len(prefix) + len(text_ids)
        if length > limit:
            print(f"eval: {bench} {item['id']}: prompt of {length} tokens cut to {limit} "
                  "(its start and end)", file=sys.stderr)
        encoded.append(cut_prompt(prefix, text_ids, limit))
    return encoded


def auto_batch_size(lm, encoded, max_new_tokens, name, bench):
    """As many rows as fit in free GPU memory (model.auto_batch_rows), else EVAL_BATCH_ROWS."""
    longest = max(map(len, encoded))
    rows = model.auto_batch_rows(lm, longest + max_new_tokens, longest, EVAL_BATCH_ROWS)
    print(f"eval: {name} {bench}: {rows} answers generate together (--batch-size auto)",
          file=sys.stderr)
    return rows


def _generate_answers(name, bench, items, get_model, path, batch_size, max_new_tokens, producer):
    """generate_answers' work, while it holds the lock on `path`."""
    kept, made, done = answer_log(path, items, max_new_tokens, producer)
    todo = [item for item in items if item["id"] not in done]
    todo_ids = {item["id"] for item in todo}
    other = len(kept.made_otherwise & todo_ids)
    if other:
        print(f"eval: {path}: {other} answer(s) made by another checkpoint, tokenizer, prompt or "
              "max_new_tokens: generating them again", file=sys.stderr)
    if not todo:
        return done
    lm, tok = get_model()
    if isinstance(lm, Served):
        return _served_answers(name, bench, todo, lm, tok, kept, made, done, max_new_tokens)
    limit = lm.args.max_seq_len - max_new_tokens
    encoded = encode_prompts(tok, todo, limit, bench)
    stops = tok.stop_ids
    # similar lengths batch with less padding
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))
    if batch_size == "auto":
        batch_size = auto_batch_size(lm, encoded, max_new_tokens, name, bench)
    progress = data.Progress(f"eval answers {name} {bench}", len(todo))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        prompts = [encoded[i] for i in batch]
        new_tokens, _ = model.generate(lm, prompts, max_new_tokens, temperature=0.0, eos_id=stops)
        finished = []
        for i, tokens in zip(batch, new_tokens):
            item_id = todo[i]["id"]
            answer_ids = model.without_stop(tokens, stops)[0]
            text = tok.decode(answer_ids).strip()
            done[item_id] = text
            finished.append({"id": item_id, "output": text, "made_by": made[item_id]})
        kept.keep(finished)
        progress.advance(len(batch))
    return done


# ---- 5. answers from a server (--served)
class Served:
    """A model whose answers come from an OpenAI-compatible server (vLLM, server.py): the
    client asking it (its model name, workers, retries) and the checkpoint's context length."""

    def __init__(self, client, context_length):
        self.client = client
        self.context_length = context_length


def _served_answers(name, bench, todo, served, tok, kept, made, done, max_new_tokens):
    """_generate_answers' work for a served model: each item asked once (served.client's
    workers at a time), greedy, with the prompt the local path would generate from, the
    same max_new_tokens and stop ids; each answer kept as it arrives. A request that fails
    for good stops the evaluation (the answers so far are kept for the next run)."""
    limit = served.context_length - max_new_tokens
    encoded = encode_prompts(tok, todo, limit, bench)
    prompts = [served_prompt(tok, item, ids) for item, ids in zip(todo, encoded)]
    lock = threading.Lock()
    ask = functools.partial(served_answer, served.client, tok, kept, made, done, max_new_tokens, lock)
    served.client.map(ask, list(zip(todo, prompts)), f"eval answers {name} {bench}")
    return done


def answers_due(out_dir, name, benches, producer):
    """Whether any of model `name`'s answers is still to be made (OUT/generations holds the
    others); a malformed line is reported later, where the answers are made."""
    for bench, items, n in benches:
        made = {item["id"]: answer_key(item, n, producer) for item in items}
        if len(data.KeptLog(answers_path(out_dir, name, bench), made, answer_made_by).kept) < len(items):
            return True
    return False


def served_prompt(tok, item, ids):
    """The text a server is sent for an item whose prompt ids (encode_prompts) are `ids`:
    its prompt, or where encode_prompts cut it, the text of the tokens kept (which the
    server encodes again, the tokenizer's prefix with it)."""
    prefix = tok.prefix_ids()
    if len(ids) == len(prefix) + len(tok.encode(item["prompt"])):
        return item["prompt"]
    return tok.decode(ids[len(prefix):])


def served_answer(client, tok, kept, made, done, max_new_tokens, lock, job):
    """One item's greedy answer from the server (temperature 0, the stop ids as vLLM's
    stop_token_ids), stripped as a local answer, kept at once."""
    item, prompt = job
    params = dict(prompt=prompt, max_tokens=max_new_tokens, temperature=0, stop_token_ids=tok.stop_ids)
    answer = client.request("/completions", params)
    text = str(get_field(answer, "choices.0.text", client.base_url + "/completions")).strip()
    with lock:
        done[item["id"]] = text
        kept.keep([{"id": item["id"], "output": text, "made_by": made[item["id"]]}])
    return text


def served_loader(directory, tokenizer_path, model_name, base_url, api_key_env, workers):
    """A function returning (Served, tokenizer) for a model answered by the server at
    base_url under model_name: nothing is loaded, nothing asked until answers are due."""
    tok = Tokenizer(tokenizer_path or directory)
    # a greedy answer of up to 512 tokens behind a queue of others: wait long, retry rarely
    client = TeacherClient(base_url, model_name, api_key_env, None, timeout=600, max_workers=workers)
    served = Served(client, teacher.context_length(directory, tok))
    return lambda: (served, tok)


# ---- 6. a model, loaded on first use
def model_loader(directory, tokenizer_path, device, dtype):
    """A function returning (model, tokenizer), loaded on first use: a fully resumed run
    loads nothing."""
    loaded = []

    def get():
        if not loaded:
            print(f"eval: loading {directory}", file=sys.stderr)
            lm = checkpoint.load_checkpoint(directory, device=device, dtype=dtype).eval()
            # its tokenizer.model or tokenizer.json
            tok = Tokenizer(tokenizer_path or directory)
            loaded.append((lm, tok))
        return loaded[0]
    return get


# ---- 7. the whole evaluation

BENCHMARKS = ("superni", "lmentry", "vicuna")  # the order of --max-new-tokens


def check_checkpoints(checkpoints, baseline, lmentry_dir, served=None):
    """Refuse bad arguments before any work: a typo should not cost an hour of answers."""
    if baseline is not None and baseline not in checkpoints:
        raise EvalError(f"--baseline {baseline!r} is not one of the checkpoints {list(checkpoints)}")
    for name in served or {}:
        if name not in checkpoints:
            raise EvalError(f"--served {name}=...: {name!r} is not one of the checkpoints "
                            f"{list(checkpoints)}")
    for name, directory in checkpoints.items():
        if not teacher.is_checkpoint(directory):
            raise EvalError(f"--checkpoints {name}={directory}: not a checkpoint folder "
                            "(no config.json or params.json there)")
    if lmentry_dir and not os.path.isdir(lmentry_dir):
        raise EvalError(f"--lmentry {lmentry_dir}: no such folder")


def lmentry_prompts(lmentry_tasks):
    """Every LMentry example as an item to answer: its id and its input in the Alpaca template."""
    if lmentry_tasks is None:
        return None
    items = []
    for task in lmentry_tasks.values():
        for item in task["items"]:
            prompt = data.alpaca_prompt(item["example"]["input"])
            items.append({"id": item["id"], "prompt": prompt})
    return items


def vicuna_pairs(names, baseline, all_pairs, questions):
    """(baseline, the model pairs to judge): every model against the baseline (default:
    the first), or every pair; no pairs without Vicuna questions or with one model."""
    if questions is None or len(names) < 2:
        return baseline, None
    baseline = baseline or names[0]
    if all_pairs:
        return baseline, list(combinations(names, 2))
    return baseline, [(name, baseline) for name in names if name != baseline]


def score_model(row, outputs, superni_items, lmentry_tasks, questions):
    """One model's scores into its results row; returns its Vicuna answers ({id: answer}) or None."""
    if superni_items is not None:
        row["superni"] = score_superni(superni_items, outputs["superni"])
    if lmentry_tasks is not None:
        row["lmentry"] = lmentry.score_tasks(lmentry_tasks, outputs["lmentry"], problem)
    if questions is None:
        return None
    answers = outputs["vicuna"]
    row["vicuna_answers"] = [{"question_id": q["id"], "answer": answers.get(q["id"], "")}
                             for q in questions]
    return answers


def judge_answers(client, questions, references, answers, pairs):
    """The judge's verdicts on every pair; a question that needs a reference and has none
    is judged without one, and reported."""
    for q in questions:
        if q["category"] in REFERENCE_CATEGORIES and q["id"] not in references:
            problem(f"Vicuna question {q['id']} ({q['category']}): no reference answer; "
                    "judged without one")
    return judge_vicuna(client, questions, references, answers, pairs)


def evaluate(checkpoints, out_dir, tokenizer=None,
             superni_dir=None, lmentry_dir=None, vicuna_dir=None,
             judge_url=None, judge_model="gpt-4", judge_api_key_env="OPENAI_API_KEY",
             baseline=None, all_pairs=False,
             batch_size="auto", max_instances=100, max_new_tokens=(128, 50, 512),
             device="cpu", dtype=None,
             dry_run=False, count_tokenizer=None, prices=(None, None),
             served=None, served_api_key_env="VLLM_API_KEY", served_workers=16):
    """Results of every checkpoint ({name: directory}) on the benchmarks given; written to
    out_dir. The judge is checked (one pre-flight request) before any answer is generated.
    dry_run: only the report of what would be generated and sent to the judge (a string);
    nothing generated, sent or written. served: {name: (model name, base URL)} of the
    checkpoints whose answers come from a server (each checked first, as the judge)."""
    PROBLEMS.clear()
    served = served or {}
    check_checkpoints(checkpoints, baseline, lmentry_dir, served)
    if not dry_run:
        refuse_replacing(out_dir)
    names = list(checkpoints)
    superni_items = read_superni(superni_dir, max_instances) if superni_dir else None
    lmentry_tasks = lmentry.read_tasks(lmentry_dir, problem) if lmentry_dir else None
    lmentry_items = lmentry_prompts(lmentry_tasks)
    questions, references = read_vicuna(vicuna_dir) if vicuna_dir else (None, None)
    all_items = (superni_items, lmentry_items, questions)
    settings = zip(BENCHMARKS, all_items, max_new_tokens)
    benches = [(bench, items, n) for bench, items, n in settings if items is not None]
    models = {}
    for name, directory in checkpoints.items():
        served_model, base_url = served.get(name, (None, None))
        models[name] = {"checkpoint": directory,
                        "producer": answer_producer(directory, tokenizer, served_model)}
        if served_model is not None:
            models[name]["server"] = {"base_url": base_url, "model": served_model}
    results = {"models": models}
    baseline, pairs = vicuna_pairs(names, baseline, all_pairs, questions)
    client = None
    if pairs and judge_url:
        judge_cache = os.path.join(out_dir, "judge_cache.jsonl")
        client = TeacherClient(judge_url, judge_model, api_key_env=judge_api_key_env, cache_path=judge_cache)
    if dry_run:
        return dry_run_report(models, out_dir, benches, questions, references, pairs, client,
                              count_tokenizer, prices)
    # before hours of answers: the judge is reachable, takes the key, knows the model
    if client:
        client.check(chat=True, temperature=0)
    loaders = {}
    for name in names:
        if name in served:
            loaders[name] = served_loader(checkpoints[name], tokenizer, *served[name], served_api_key_env,
                                          served_workers)
            served_model, tok = loaders[name]()
            # and so are the servers that answers are due from: each answers as the model asked for
            if answers_due(out_dir, name, benches, models[name]["producer"]):
                teacher.preflight_served(served_model.client, 1, tok.stop_ids)
        else:
            loaders[name] = model_loader(checkpoints[name], tokenizer, device, dtype)
    os.makedirs(out_dir, exist_ok=True)
    answers = {}
    for name in names:
        get_model = loaders[name]
        row = models[name]
        outputs = {}
        for bench, items, n in benches:
            outputs[bench] = generate_answers(name, bench, items, get_model, out_dir,
                                              batch_size, n, row["producer"])
        answers[name] = score_model(row, outputs, superni_items, lmentry_tasks, questions)
    if pairs and not judge_url:
        problem("Vicuna QA: no --judge-url, so no model pair was judged")
    elif pairs:
        judged = judge_answers(client, questions, references, answers, pairs)
        results["vicuna"] = dict(judged, baseline=baseline, judge=judge_model)
    results["skipped"] = list(PROBLEMS)
    write_results(out_dir, results)
    return results


def refuse_replacing(out_dir):
    """An evaluation continues in an existing OUT by design (its answers and judge replies are kept and
    added to) and rewrites OUT/results.json and OUT/results.md: each only if eval.py wrote it (results.json:
    an object with "models" and "skipped"; results.md: its title), never a user's or a demo's file of that
    name, which is refused by name before any answer and left as it is."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"--out {out_dir} is a file, not a folder: choose another --out")
    for name, ours in (("results.json", written_results_json), ("results.md", written_results_markdown)):
        path = os.path.join(out_dir, name)
        if os.path.lexists(path) and not ours(path):
            raise EvalError(f"{path} was not written by eval.py, so it is left as it is: choose another "
                            "--out, or move the file away")


def written_results_json(path):
    """Whether path is a results.json eval.py wrote: a plain file holding an object with "models" and
    "skipped"."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    # unreadable, not UTF-8 or not JSON (ValueErrors), nested too deep
    except (OSError, ValueError, RecursionError):
        return False
    return not os.path.islink(path) and isinstance(results, dict) and {"models", "skipped"} <= set(results)


def written_results_markdown(path):
    """Whether path is a results.md eval.py wrote: a plain file that starts with its title."""
    title = (RESULTS_TITLE + "\n").encode()
    try:
        with open(path, "rb") as f:
            start = f.read(len(title))
    except OSError:
        return False
    return not os.path.islink(path) and start == title


def write_results(out_dir, results):
    """OUT/results.json and OUT/results.md, each written whole (data.write_atomic)."""
    results_json = json.dumps(results, indent=1, ensure_ascii=False)
    data.write_atomic(os.path.join(out_dir, "results.json"), results_json)
    data.write_atomic(os.path.join(out_dir, "results.md"), results_markdown(results))


def dry_run_report(models, out_dir, benches, questions, references, pairs, client,
                   count_tokenizer, prices):
    """What a run would do, with nothing generated or sent: the answers still to generate
    (the others are in OUT/generations), and the judge's requests (teacher.DryRun): exact
    where both answers of a judgment are generated already, else estimated, a missing
    answer counted at its max_new_tokens."""
    lines = ["eval.py: dry run, nothing generated, nothing sent"]
    known = {}
    for name, row in models.items():
        counts = []
        for bench, items, n in benches:
            path = answers_path(out_dir, name, bench)
            _, _, done = answer_log(path, items, n, row["producer"])
            to_generate = len(items) - len(done)
            counts.append(f"{bench} {to_generate:,} of {len(items):,}")
            known[name, bench] = done
        lines.append(f"  answers to generate, {name}: " + ", ".join(counts))
    if not pairs or client is None:
        why = "" if pairs else " (--vicuna and 2+ checkpoints judge pairs)"
        return "\n".join(lines + ["  judge: no model pair to judge" + why])
    vicuna_tokens = {bench: n for bench, _, n in benches}["vicuna"]
    dry = teacher.DryRun(client, count_tokenizer)
    unknown = 0
    for m1, m2, q, order, reference in judge_jobs(questions, references, pairs):
        first_model, second_model = shown_order(m1, m2, order)
        first = known[first_model, "vicuna"].get(q["id"])
        second = known[second_model, "vicuna"].get(q["id"])
        missing = (first is None) + (second is None)
        unknown += missing > 0
        messages = judge_messages(q["question"], first or "", second or "", reference)
        unknown_tokens = missing * vicuna_tokens
        dry.add(*judge_request(messages), JUDGE_MAX_TOKENS, unknown_prompt_tokens=unknown_tokens)
    if unknown:
        prompt_note = (f"estimated: {unknown:,} judgment(s) with an answer not generated yet, "
                       f"counted at --max-new-tokens VICUNA {vicuna_tokens}, "
                       "the most an answer holds in its model's tokens")
    else:
        prompt_note = "every answer is generated"
    reply_note = f"{JUDGE_MAX_TOKENS} a judgment"
    report = dry.report("eval.py judge", prompt_note, reply_note, *prices)
    return "\n".join(lines + report.splitlines()[1:])


# ---- 8. results.md
def dash(value):
    """A table cell: the value, or a dash where there is none."""
    return "—" if value is None else str(value)


def table_row(cells):
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table_head(columns):
    """A Markdown table's header row and its separator."""
    return [table_row(columns), "|---" * len(columns) + "|"]


def versus_baseline(pairs, name, baseline):
    """The tally of `name` judged against the baseline (None: not judged)."""
    for counts in pairs.values():
        if counts["model_1"] == name and counts["model_2"] == baseline:
            return counts
    return None


def table1_lines(models, vicuna):
    """Rows = models, columns = benchmarks (the paper's Table 1 shape)."""
    pairs = vicuna.get("pairs", {})
    baseline = vicuna.get("baseline", "—")
    lines = table_head(["Model",
                        "Super-NI ROUGE-L",
                        "Super-NI EM",
                        "LMentry accuracy",
                        "LMentry score",
                        f"Vicuna QA vs {baseline}: win / lose / tie"])
    for name, row in models.items():
        superni = row.get("superni", {}).get("overall", {})
        lmentry_scores = row.get("lmentry", {})
        versus = versus_baseline(pairs, name, baseline)
        tally = f"{versus['win']} / {versus['lose']} / {versus['tie']}" if versus else "—"
        lines.append(table_row([name,
                                dash(superni.get("rougeL")),
                                dash(superni.get("exact_match")),
                                dash(lmentry_scores.get("accuracy")),
                                dash(lmentry_scores.get("lmentry_score")),
                                tally]))
    return lines


def vicuna_lines(vicuna):
    """Every judged pair's tally and win rates; nothing where no pair was judged."""
    pairs = vicuna.get("pairs", {})
    if not pairs:
        return []
    lines = ["", f"## Vicuna QA, each pair judged by {vicuna['judge']} in both orders", ""]
    lines += table_head(["Model 1 vs model 2", "win", "lose", "tie", "no verdict",
                         "win rate", "adjusted win rate"])
    for pair, c in pairs.items():
        win_rates = [dash(c["win_rate"]), dash(c["adjusted_win_rate"])]
        lines.append(table_row([pair, c["win"], c["lose"], c["tie"], c["error"], *win_rates]))
    return lines


def category_cell(per_category, category):
    """A category's score in its own metric, named; a dash where the model has none."""
    if category not in per_category:
        return "—"
    metrics = per_category[category]
    metric = metrics["metric"]
    return f"{metrics[metric]} ({metric})"


def category_lines(models):
    """Super-NI per category, each in its Tk-Instruct metric; nothing without Super-NI."""
    per_model = {name: row.get("superni", {}).get("per_category", {})
                 for name, row in models.items()}
    categories = sorted(set().union(*per_model.values()))
    if not categories:
        return []
    lines = ["", "## Super-NI per category (its Tk-Instruct metric)", ""]
    lines += table_head(["Model", *categories])
    for name, per_category in per_model.items():
        cells = [category_cell(per_category, c) for c in categories]
        lines.append(table_row([name, *cells]))
    return lines


# results.md's first line, by which a later run knows the file for its own
RESULTS_TITLE = "# Evaluation results"


def results_markdown(results):
    """Rows = models, columns = benchmarks (the paper's Table 1 shape), then the detail tables."""
    vicuna = results.get("vicuna", {})
    skipped = results["skipped"]
    lines = [RESULTS_TITLE, ""]
    lines += table1_lines(results["models"], vicuna)
    lines += vicuna_lines(vicuna)
    lines += category_lines(results["models"])
    lines += ["", f"## Skipped ({len(skipped)})", ""]
    lines += [f"- {p}" for p in skipped]
    return "\n".join(lines) + "\n"


# ---- 9. the command line
def parse_checkpoints(parser, specs):
    """{name: directory} of --checkpoints NAME=DIR ...; a bad or repeated NAME is a usage error."""
    checkpoints = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        well_formed = sep and name and directory
        if not well_formed or name in checkpoints:
            parser.error(f"--checkpoints: {spec!r} is not NAME=DIR with a new NAME")
        refuse_folder_name(parser, "--checkpoints", spec, name)
        checkpoints[name] = directory
    return checkpoints


def parse_served(parser, specs):
    """{name: (model name, base URL)} of --served NAME=MODEL@URL ...; a malformed or
    repeated NAME is a usage error."""
    served = {}
    for spec in specs or []:
        name, _, rest = spec.partition("=")
        model_name, _, base_url = rest.partition("@")
        if not (name and model_name and base_url) or name in served:
            parser.error(f"--served: {spec!r} is not NAME=MODEL@URL with a new NAME")
        refuse_folder_name(parser, "--served", spec, name)
        served[name] = (model_name, base_url)
    return served


def refuse_folder_name(parser, flag, spec, name):
    """A model's NAME names its answers' folder, OUT/generations/NAME: one that would lead out of
    OUT/generations (or be no folder) is a usage error, whatever it was meant to be."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        parser.error(f"{flag}: {spec!r}: NAME names the folder OUT/generations/NAME, so it must not be "
                     "empty, '.' or '..', nor hold '/' or a NUL character")


def command_inputs(args, checkpoints):
    """The files and folders an evaluation reads, by the flag that names them (None: not given)."""
    inputs = {f"--checkpoints {name}": directory for name, directory in checkpoints.items()}
    for flag in ("tokenizer", "superni", "lmentry", "vicuna", "count_tokenizer"):
        inputs["--" + flag.replace("_", "-")] = getattr(args, flag)
    return inputs


def evaluate_options(args):
    """evaluate()'s keyword arguments from the command line (all but the dry run's)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return dict(tokenizer=args.tokenizer,
                superni_dir=args.superni,
                lmentry_dir=args.lmentry,
                vicuna_dir=args.vicuna,
                judge_url=args.judge_url,
                judge_model=args.judge_model,
                judge_api_key_env=args.judge_api_key_env,
                baseline=args.baseline,
                all_pairs=args.all_pairs,
                batch_size=args.batch_size,
                max_instances=args.max_instances,
                max_new_tokens=tuple(args.max_new_tokens),
                device=args.device,
                dtype=dtype,
                served_api_key_env=args.served_api_key_env,
                served_workers=args.served_workers)


def argument_parser():
    """eval.py's command line."""
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--tokenizer",
                        help="tokenizer.model or tokenizer.json (default: each checkpoint's)")
    parser.add_argument("--superni", help="folder with test_tasks.txt and tasks/")
    parser.add_argument("--lmentry", help="folder with LMentry's <task>.json data files")
    parser.add_argument("--vicuna",
                        help="folder with question.jsonl and reference_answer_gpt-4.jsonl")
    parser.add_argument("--judge-url",
                        help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    parser.add_argument("--judge-model", default="gpt-4")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--baseline",
                        help="Vicuna QA: the model the others are judged against "
                             "(default: the first)")
    parser.add_argument("--all-pairs", action="store_true",
                        help="Vicuna QA: judge every pair of models")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=data.rows_option, default="auto",
                        help="answers generated together; "
                             "auto (default): as many as fit in free GPU memory, "
                             f"{EVAL_BATCH_ROWS} on a CPU")
    parser.add_argument("--max-instances", type=int, default=100,
                        help="Super-NI instances per task")
    parser.add_argument("--max-new-tokens", type=int, nargs=3, default=[128, 50, 512],
                        metavar=("SUPERNI", "LMENTRY", "VICUNA"))
    parser.add_argument("--device", default=checkpoint.default_device())
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--served", nargs="+", metavar="NAME=MODEL@URL",
                        help="NAME's answers from the OpenAI-compatible server at URL serving "
                             "NAME's checkpoint as MODEL (e.g. tuna=runs/tuna@http://127.0.0.1:8000/v1 "
                             "after `vllm serve runs/tuna`), greedy as here, instead of loading it. "
                             "An option of its own: NAME stays in --checkpoints, whose folder still "
                             "keys the answers and gives the tokenizer (prompt cut, stop ids)")
    parser.add_argument("--served-api-key-env", default="VLLM_API_KEY",
                        help="environment variable with the --served servers' API key (may be unset)")
    parser.add_argument("--served-workers", type=int, default=16,
                        help="concurrent requests to each --served server")
    data.add_cost_arguments(parser, "print the answers still to generate and the judge's requests, "
                            "tokens and cost; generate, send and write nothing")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    checkpoints = parse_checkpoints(parser, args.checkpoints)
    options = evaluate_options(args)
    options["served"] = parse_served(parser, args.served)
    try:
        # before anything is written, OUT.lock included: an output over an input would destroy what it reads
        data.refuse_output_over_inputs(args.out, command_inputs(args, checkpoints))
        if args.dry_run:  # writes nothing, so takes no lock
            prices = (args.price_per_1m_input, args.price_per_1m_output)
            report = evaluate(checkpoints, args.out, **options, dry_run=True,
                              count_tokenizer=args.count_tokenizer, prices=prices)
            print(report)
            return
        with data.lock_output(args.out):  # one evaluation at a time writes OUT
            results = evaluate(checkpoints, args.out, **options)
    # each names its file or URL
    except (data.OutputLocked, TeacherError, OSError, ValueError) as e:
        message = " ".join(str(e).split())
        parser.exit(1, f"eval.py: error: {message}\n")
    print(results_markdown(results))


if __name__ == "__main__":
    main()
