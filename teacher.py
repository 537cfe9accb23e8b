"""Ranking data from teachers: the ranked candidates Tuna trains on (paper, section 2).

The method, read from the top (README, "Faithfulness notes" for the choices made):
1. Probabilistic ranking (section 2.1): the teacher writes n answers per instruction, each
   scored by its mean token log-prob; sorted, best first. Tuna_p trains on them.
2. The student's samples (section 2.2): n answers per instruction under the diversity rule.
3. Contextual ranking (section 2.2): the teacher sees the student's answers in one prompt
   and ranks them; its reply is parsed into a ranking. Tuna_c trains on them.
4. What both builders share: the items, the run over them, the failures file.
Then the details the method calls by name, and the plumbing:
5. The dataset's own answer as a candidate (--add-original).
6. Where the teacher's reference answer ends in its ranking reply.
7. The fast path: the diversity rule for many prompts in batches.
8. The student's samples on disk: their cache and what made them.
9. The student's samples from a server (vLLM, server.py) over the student checkpoint.
10. --dry-run: the requests a run would send, counted and priced, never sent.
11. The command line.
Requests go through client.py (cache, retries, rate limit); server.py serves a local teacher.

    python teacher.py probabilistic --data alpaca_data.json --base-url https://api.openai.com/v1 \
        --model gpt-3.5-turbo-instruct --out data/probabilistic.jsonl                   # Tuna_p's data
    python teacher.py contextual --data alpaca_data.json --student runs/tuna_p \
        --base-url https://api.openai.com/v1 --model gpt-4 --out data/contextual.jsonl   # Tuna_c's data
    # the student's samples from vLLM (`vllm serve runs/tuna_p`) instead of a model loaded here
    python teacher.py contextual ... --student runs/tuna_p \
        --student-base-url http://127.0.0.1:8000/v1 --student-model runs/tuna_p
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import threading

import torch

import data
from checkpoint import (args_from_hf_config, args_from_meta_params, checkpoint_identity, default_device,
                        load_checkpoint)
from client import PREFLIGHT_TEXT, RunError, TeacherClient, TeacherError, get_field, one_line
from model import auto_batch_rows, generate, without_stop
from server import chat_prompt
from tokenizer import Tokenizer

log = logging.getLogger("teacher")


class ReplyError(ValueError):
    """An answer that cannot become a training record (an unparseable ranking, say); `raw`: the reply."""

    def __init__(self, message, raw=None):
        super().__init__(message)
        self.raw = raw


# ---- 1. probabilistic ranking: n teacher answers, ranked by mean token log-prob

def build_probabilistic(client, examples, out_path, failures_path=None, n=4, max_tokens=256, temperature=1.0,
                        chat=False, add_original=None, retry_failures=False):
    """Probabilistic ranking (paper, section 2.1): n teacher samples per instruction, each scored by its mean
    token log-prob, best first. Identical samples are kept once (equal texts cannot be ranked against each
    other), and are not replaced by asking again (that would favour the teacher's less likely answers). A
    sample cut by max_tokens (finish_reason "length") stays a candidate, listed in source["unfinished"]:
    trained without EOS. add_original: None; "scored" = the dataset's response scored by the same teacher
    (echo, /completions only) and sorted in; "first" = placed best (gold), its score unknown (scores null)."""
    if add_original not in (None, "scored", "first"):
        raise ValueError(f"add_original must be None, 'scored' or 'first', not {add_original!r}")
    if add_original == "scored" and chat:
        raise ValueError("add_original='scored' needs /completions with echo; chat has no echo: use 'first'")
    asked = Asking(n, max_tokens, temperature, chat, add_original, retry_failures)
    record_of = functools.partial(probabilistic_record, client, asked)
    return build_ranked("probabilistic", client, examples, record_of, out_path, failures_path)


@dataclasses.dataclass(frozen=True)
class Asking:
    """How probabilistic ranking asks the teacher (build_probabilistic's arguments)."""
    n: int
    max_tokens: int
    temperature: float
    chat: bool
    add_original: object
    retry_failures: bool

    @property
    def distinct_needed(self):
        """Distinct samples an item needs: 2, or 1 when the original answer is the second candidate."""
        return 1 if self.add_original else 2


def probabilistic_record(client, asked, item):
    """The item's samples, ranked by mean token log-prob, best first (paper, section 2.1)."""
    item_id, ex, prompt = item
    found, requests_made = teacher_samples(client, asked, item)
    scored, finished = distinct_samples(found)
    url = teacher_url(client, asked.chat)
    if len(scored) < asked.distinct_needed:
        raise ReplyError(f"{url}: only {len(scored)} distinct non-empty sample(s) with "
                         f"log-probs from {requests_made} request(s)")
    ranked = sorted(scored.items(), key=by_score, reverse=True)
    original = ex.get("output", "").strip()
    if asked.add_original:
        ranked = with_original(client, asked, ranked, prompt, ex)
        # the dataset's answer is finished, even where a cut sample equals it
        finished[original] = True
    if len(ranked) < 2:
        raise ReplyError(f"{url}: fewer than 2 distinct candidates")
    texts = [text for text, _ in ranked]
    scores = [score for _, score in ranked]
    original_index = texts.index(original) if asked.add_original and original in texts else None
    unfinished = [k for k, text in enumerate(texts) if not finished.get(text, True)]
    source = {"kind": "probabilistic", "teacher": client.model, "chat": asked.chat, "requests": requests_made,
              "original_index": original_index, "unfinished": unfinished}
    if asked.add_original == "first":
        source["teacher_scores"] = scores[1:]
        scores = None
    return data.RankedRecord(id=item_id, prompt=prompt, candidates=texts, scores=scores,
                             instruction=ex["instruction"], input=ex.get("input", ""), source=source)


def mean_logprob(logprobs):
    """An answer's score: its total log-prob over its number of tokens (paper, section 2.1)."""
    return sum(logprobs) / len(logprobs)


# A server may return fewer choices than n (llama.cpp ignores n, others cap it): further requests then ask for
# one choice each, with seeds 1, 2, ... (each its own cache entry): at most this many requests per sample.
REQUESTS_PER_SAMPLE = 2


def teacher_samples(client, asked, item):
    """The item's usable choices and the number of requests they took. Past the bound (or with n samples but
    too few distinct ones) only cached answers are read, and with retry_failures one new request is paid for
    an item that would fail: a re-run replays exactly the requests of the runs before it."""
    found = []
    k = 0
    fresh = asked.retry_failures
    while True:
        distinct = len({text for text, _, _ in found})
        if len(found) >= asked.n and distinct >= asked.distinct_needed:
            return found, k
        path, params = probabilistic_request(item, k, asked.n, asked.max_tokens,
                                             asked.temperature, asked.chat)
        past_bound = len(found) >= asked.n or k >= REQUESTS_PER_SAMPLE * asked.n
        answer = client.request(path, params, cache_only=past_bound)
        if answer is None and fresh and distinct < asked.distinct_needed:
            answer = client.request(path, params)
            fresh = False
        if answer is None:
            return found, k
        found += usable_choices(answer, teacher_url(client, asked.chat), asked.chat)
        k += 1


def probabilistic_request(item, k, n, max_tokens, temperature, chat):
    """(path, params) of an item's request k in probabilistic ranking: request 0 asks for n choices, as the
    authors did; k > 0 for one more, with seed k. The run and its dry run build the same requests."""
    _, ex, prompt = item
    choices = dict(n=n) if k == 0 else dict(n=1, seed=k)
    options = dict(max_tokens=max_tokens, temperature=temperature, **choices)
    if chat:  # a chat teacher gets the instruction itself, not our template
        user = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
        messages = [{"role": "user", "content": user}]
        return "/chat/completions", dict(messages=messages, logprobs=True, **options)
    return "/completions", dict(prompt=prompt, logprobs=1, **options)


def usable_choices(answer, url, chat):
    """(text, mean log-prob, finished) of each choice with a non-empty text and log-probs."""
    found = []
    for i in range(len(get_field(answer, "choices", url))):
        text, logprobs = choice_logprobs(answer, i, url, chat)
        if isinstance(text, str) and text.strip() and logprobs:
            finished = answer["choices"][i].get("finish_reason") != "length"
            found.append((text.strip(), mean_logprob(logprobs), finished))
    return found


def choice_logprobs(answer, i, url, chat):
    """(text, [token log-prob]) of choice i, in the chat or the completions layout."""
    if chat:
        text = get_field(answer, f"choices.{i}.message.content", url)
        tokens = get_field(answer, f"choices.{i}.logprobs.content", url)
    else:
        text = get_field(answer, f"choices.{i}.text", url)
        tokens = get_field(answer, f"choices.{i}.logprobs.token_logprobs", url)
    try:
        values = [t["logprob"] for t in tokens] if chat else list(tokens)
        return text, [float(value) for value in values if value is not None]
    except (TypeError, KeyError, ValueError):
        raise ReplyError(f"{url}: malformed log-probs in choices[{i}]") from None


def distinct_samples(found):
    """({text: its mean log-prob}, {text: finished}) of (text, score, finished) samples: identical texts are
    kept once (the first one's score), finished if any copy was."""
    scored, finished = {}, {}
    for text, score, done in found:
        scored.setdefault(text, score)
        finished[text] = finished.get(text, False) or done
    return scored, finished


def by_score(pair):
    """The sort key of a (text, mean log-prob) pair."""
    return pair[1]


def teacher_url(client, chat):
    """The URL a ranking request goes to, for messages."""
    return client.base_url + ("/chat/completions" if chat else "/completions")


# ---- 2. the student's samples: n answers per instruction under the diversity rule

def diversity_rule(sample_round, temperature=0.8, tries=3, threshold=0.8):
    """The diversity rule (paper, section 2.2) over any sampler: sample n answers at temperature t; while some
    pair has ROUGE-L F1 >= threshold, sample again at t + 0.1, `tries` rounds in all; keep the round with the
    lowest mean pairwise ROUGE-L. sample_round(r, t) -> (n texts, which of them finished) draws round r
    (0-based) at temperature t: model.generate (diverse_samples below) or a server (section 9) plug in.
    -> {candidates, finished, temperature, round, mean_rouge_l}."""
    best = None
    for r in range(tries):
        t = round_temperature(temperature, r)
        texts, finished = sample_round(r, t)
        best, diverse = more_diverse(best, texts, finished, t, r, threshold)
        if diverse:
            break
    return best


def round_temperature(temperature, r):
    """Round r's temperature under the diversity rule: 0.1 hotter each round."""
    return round(temperature + 0.1 * r, 6)


def more_diverse(best, texts, finished, temperature, r, threshold):
    """(the round kept so far: round r, unless `best` has the lower mean pairwise ROUGE-L; whether round r is
    diverse enough: no pair at or above threshold)."""
    pairs = pairwise_rouge_l(texts)
    mean_rouge_l = sum(pairs) / len(pairs)
    if best is None or mean_rouge_l < best["mean_rouge_l"]:
        best = {"candidates": texts, "finished": finished, "temperature": temperature, "round": r + 1,
                "mean_rouge_l": mean_rouge_l}
    return best, max(pairs) < threshold


def pairwise_rouge_l(texts):
    """ROUGE-L F1 of every pair of texts ([0.0] when there is no pair), with the Porter stemmer, as the
    authors (rouge_scorer, use_stemmer=True)."""
    from rouge_score import rouge_scorer  # on first use: importing it sets up absl logging
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(a, b)["rougeL"].fmeasure for a, b in itertools.combinations(texts, 2)] or [0.0]


def diverse_samples(model, tok, prompt, n=4, temperature=0.8, max_new_tokens=256, tries=3, threshold=0.8,
                    generators=None):
    """n student answers to one prompt under the diversity rule, drawn by model.generate -> diversity_rule's
    result; "finished": which answers ended in one of tok.stop_ids (the others hit max_new_tokens).
    generators: None (torch's default) or n torch.Generators, one per answer. A run samples many prompts at
    once with sample_diverse (section 7), tested equal to this rule."""
    ids = tok.encode(prompt, bos=True)
    budget = answer_budget(model.args.max_seq_len, ids, max_new_tokens)
    sample_round = functools.partial(generated_round, model, tok, ids, n, budget, generators)
    return diversity_rule(sample_round, temperature, tries, threshold)


def answer_budget(max_seq_len, ids, max_new_tokens):
    """The most tokens an answer to the prompt `ids` may hold: a long prompt leaves fewer to its answer."""
    return max(0, min(max_new_tokens, max_seq_len - len(ids)))


def generated_round(model, tok, ids, n, budget, generators, r, temperature):
    """One round of n answers to the prompt `ids` from model.generate -> (texts, finished)."""
    outs, _ = generate(model, [ids], budget, temperature=temperature, eos_id=tok.stop_ids,
                       generator=generators, num_samples=n)
    return decoded_answers(tok, outs)


def decoded_answers(tok, outs):
    """(texts, finished) of generated answers: each cut at its stop id (finished) or not (it hit the token
    budget), decoded and stripped."""
    answers = [without_stop(out, tok.stop_ids) for out in outs]
    return [tok.decode(answer).strip() for answer, _ in answers], [done for _, done in answers]


# ---- 3. contextual ranking: the teacher ranks the student's answers in one prompt

def build_contextual(client, examples, samples, out_path, failures_path=None, keep_reference=True,
                     retry_failures=False, temperature=1.0, max_tokens=2048):
    """Contextual ranking (paper, section 2.2): the teacher ranks the student's candidates (samples: {id:
    {"candidates": [...], "finished": [...]}} from sample_candidates; "finished" defaults to all) in one chat
    request per instruction, at the authors' temperature 1.0 and 2048 tokens. The teacher's reference answer
    (index n) is kept as a candidate unless keep_reference is False, or unless it cannot be cut out of the
    reply unambiguously (source["reference_problem"] says why). Empty responses and exact copies of a
    better-ranked one are left out of the record (source["ranks"] keeps the teacher's full ranking,
    source["kept_ranks"] the one trained on); a candidate that hit the student's token limit is listed in
    source["unfinished"]. A reply cut by max_tokens (finish_reason "length") is a failure: its ranking may be
    incomplete."""
    ranking = Ranking(keep_reference, retry_failures, temperature, max_tokens)
    record_of = functools.partial(contextual_ranked, client, samples, ranking)
    return build_ranked("contextual", client, examples, record_of, out_path, failures_path)


@dataclasses.dataclass(frozen=True)
class Ranking:
    """How contextual ranking asks the teacher (build_contextual's arguments)."""
    keep_reference: bool
    retry_failures: bool
    temperature: float
    max_tokens: int


RANKING_SYSTEM = "You are a professional, experienced data annotator."


def ranking_messages(prompt, candidates):
    """The contextual-ranking request (paper, section 2.2): this project's own wording of the authors' prompt
    (tuna/src/gpt-eval.py, GroupEval.group_eval), its five steps and its "rank: [...]" line; index
    len(candidates) is the teacher's own reference answer. The format example shows placeholders, as the
    authors' prompt does ("rank: [i, j, k, l, m]"): concrete indices in presentation order would suggest an
    answer."""
    n = len(candidates)
    if n > 17:
        raise ValueError(f"the ranking prompt names at most 17 candidates (placeholders i..z), not {n}")
    shown = "\n\n".join(f"###Response {i}:\n{text}" for i, text in enumerate(candidates))
    placeholders = ", ".join(chr(ord("i") + k) for k in range(n + 1))
    user = (f"Below is an instruction and {n} responses to it.\n\n{prompt}\n\n{shown}\n\n"
            f"Follow these steps:\n"
            f"(1) Say whether the instruction is open-ended or close-ended.\n"
            f"(2) Write one high-quality reference answer to the instruction, starting with "
            f"\"###Response {n}:\".\n"
            f"(3) Find the responses that duplicate each other and keep only one of each.\n"
            f"(4) Score each response from 0 to 15 against the reference answer. Open-ended instruction: "
            f"relevance, level of details/justification and accuracy, each 0-5. Close-ended instruction: "
            f"accuracy, level of details/justification and clarity, each 0-5. Write each as \"Response k: "
            f"[sum]\".\n"
            f"(5) Rank all responses, the reference answer (Response {n}) included, in decreasing order of "
            f"score, as \"rank: [{placeholders}]\" (shorter if you dropped duplicates).")
    return [{"role": "system", "content": RANKING_SYSTEM}, {"role": "user", "content": user}]


def ranking_request(prompt, candidates, temperature=1.0, max_tokens=2048):
    """(path, params) of the contextual-ranking request for one instruction (the run and its dry run)."""
    messages = ranking_messages(prompt, candidates)
    return "/chat/completions", dict(messages=messages, temperature=temperature, max_tokens=max_tokens)


def contextual_ranked(client, samples, ranking, item):
    """The item's RankedRecord: its student samples as the teacher ranked them."""
    item_id, ex, prompt = item
    entry = samples.get(item_id)
    if not entry:
        raise ReplyError("no student candidates")
    candidates = entry["candidates"]
    path, params = ranking_request(prompt, candidates, ranking.temperature, ranking.max_tokens)
    parse = functools.partial(parse_ranked_reply, teacher_url(client, chat=True), candidates, ranking)
    ranked, attempt = ask(client, path, params, parse, ranking.retry_failures)
    return contextual_record(client, item, entry, ranked, attempt)


def ask(client, path, params, parse, retry_failures):
    """(parse(answer), attempt) for the first answer that parses. Attempt k > 0 sends seed=k, so each attempt
    has its own cache entry: a re-run reads all earlier attempts from the cache and only with retry_failures
    pays for one new one. Raises the last ReplyError/TeacherError when none parses."""
    fresh_left = retry_failures
    error = None
    for attempt in itertools.count():
        attempt_params = dict(params, seed=attempt) if attempt else params
        answer = client.request(path, attempt_params, cache_only=attempt > 0)
        if answer is None and fresh_left:
            answer = client.request(path, attempt_params)
            fresh_left = False
        if answer is None:
            raise error
        try:
            return parse(answer), attempt
        except (ReplyError, TeacherError) as e:
            error = e


@dataclasses.dataclass(frozen=True)
class RankedReply:
    """What one ranking reply gives: the teacher's ranks, its reference answer (or why there is none), the
    indices kept for training, best first, and the texts they index (candidates, then the reference)."""
    reply: str
    ranks: list
    reference: object
    problem: object
    kept: list
    pool: list


def parse_ranked_reply(url, candidates, ranking, answer):
    """A RankedReply from the teacher's answer; ReplyError when it cannot train anything."""
    reply = str(get_field(answer, "choices.0.message.content", url))
    if get_field(answer, "choices.0", url).get("finish_reason") == "length":
        raise ReplyError(f"the reply was cut at max_tokens={ranking.max_tokens} (finish_reason 'length'), "
                         "so its ranking may be incomplete", reply)
    ranks = parse_ranking(reply, len(candidates))
    reference, problem = reference_answer(reply, len(candidates))
    pool = candidates + [reference if ranking.keep_reference else None]
    kept = []
    # an empty text or a copy of a better-ranked one cannot be ranked against it
    for i in ranks:
        if pool[i] and pool[i] not in [pool[k] for k in kept]:
            kept.append(i)
    if len(kept) < 2:
        raise ReplyError(f"fewer than 2 non-empty ranked candidates in ranks {ranks}", reply)
    return RankedReply(reply, ranks, reference, problem, kept, pool)


def parse_ranking(reply, n):
    """The ranks, best first, from a ranking reply over n candidates + the teacher's own answer (index n). As
    the authors: lowercase, the text after the last "rank:" (else "ranking:"), integers in order. Unlike them,
    only the integers inside the [...] list (or on that line) are read, and each index must be in 0..n at most
    once, so stray digits become a ReplyError instead of training data."""
    text = reply.lower()
    key = "rank:" if "rank:" in text else "ranking:"
    if key not in text:
        raise ReplyError("no 'rank:' in the reply", reply)
    tail = text.rsplit(key, 1)[1].lstrip()
    listed = tail[1:].split("]", 1)[0] if tail.startswith("[") else tail.split("\n", 1)[0]
    ranks = [int(x) for x in re.findall(r"\d+", listed)]
    bad = [r for r in ranks if r > n]
    if bad:
        problem = f"index {bad[0]} out of range 0..{n}"
    elif len(set(ranks)) != len(ranks):
        problem = "an index appears twice"
    elif len(ranks) < 2:
        problem = f"{len(ranks)} index(es), need 2+"
    else:
        return ranks
    raise ReplyError(f"bad ranking {listed.strip()!r}: {problem}", reply)


def contextual_record(client, item, entry, ranked, attempt):
    """The training record of one ranked item; its source keeps the whole reply and the student's samples."""
    item_id, ex, prompt = item
    candidates = entry["candidates"]
    finished = entry.get("finished") or [True] * len(candidates)
    kept = ranked.kept
    unfinished = [k for k, i in enumerate(kept) if i < len(candidates) and not finished[i]]
    sampled = {k: entry.get(k) for k in ("temperature", "round", "mean_rouge_l")}
    student = (entry.get("settings") or {}).get("student")
    source = {"kind": "contextual", "teacher": client.model, "ranks": ranked.ranks, "kept_ranks": kept,
              "raw_reply": ranked.reply, "reference": ranked.reference, "reference_problem": ranked.problem,
              "student_candidates": candidates, "attempt": attempt, "unfinished": unfinished, **sampled,
              "student": student}
    return data.RankedRecord(id=item_id, prompt=prompt, candidates=[ranked.pool[i] for i in kept],
                             instruction=ex["instruction"], input=ex.get("input", ""), source=source)


# ---- 4. what both builders share: the items, the run over them, the failures file

def _items(examples):
    """(id, example, Alpaca prompt) per example; the id is the example's own "id" or its position."""
    return [(str(ex.get("id", i)), ex, data.alpaca_prompt(ex["instruction"], ex.get("input", "")))
            for i, ex in enumerate(examples)]


def build_ranked(kind, client, examples, record_of, out_path, failures_path):
    """Both builders' run: record_of(item) for every item, over the client's workers; the records written to
    out_path, the failures to failures_path."""
    results = client.map(functools.partial(item_result, kind, client, record_of), _items(examples),
                         f"{kind} ranking", failed=is_failure)
    return _finish(kind, client, results, out_path, failures_path)


def item_result(kind, client, record_of, item):
    """("done", record_of(item)) or ("failed", why); a RunError stops the run."""
    try:
        return "done", record_of(item)
    except RunError:
        raise
    except (ReplyError, TeacherError) as e:
        return "failed", _failure(kind, item, e, client.model)


def is_failure(result):
    """Whether a builder's result for one item is ("failed", why)."""
    return result[0] == "failed"


def _failure(kind, item, error, teacher):
    """The failures file's line for an item that gave no record: its prompt, the error and the teacher's reply
    (raw_reply, when there was one)."""
    item_id, ex, prompt = item
    return {"id": item_id, "kind": kind, "instruction": ex["instruction"], "input": ex.get("input", ""),
            "prompt": prompt, "error": str(error), "raw_reply": getattr(error, "raw", None),
            "teacher": teacher}


# the failures file beside OUT, unless --failures names another
FAILURES_SUFFIX = ".failures.jsonl"


def _finish(kind, client, results, out_path, failures_path):
    """Write the records and the failures. A run where every item failed is an error, and replaces no OUT."""
    records = [r for status, r in results if status == "done"]
    failures = [r for status, r in results if status == "failed"]
    failures_path = failures_path or out_path + FAILURES_SUFFIX
    data.write_atomic(failures_path, (json.dumps(row, ensure_ascii=False) + "\n" for row in failures))
    if failures and not records:
        print(f"{kind}: 0 done, {len(failures)} failed; {client.report()}")
        first = failures[0]
        raise RunError(f"every item failed ({len(failures)} of {len(failures)}; {out_path} not written), "
                       f"e.g. item {first['id']}: {one_line(first['error'])}; all are listed in "
                       f"{failures_path}")
    data.write_ranked_jsonl(out_path, records)
    print(f"{kind}: {len(records)} done, {len(failures)} failed -> {out_path}; {client.report()}")
    return dict(done=len(records), failed=len(failures), **client.counts)


# ---- 5. the dataset's own answer as a candidate (--add-original)

ECHO_REFUSED = ("the teacher refuses to score a given text (echo with logprobs), which --add-original scored "
                "needs; OpenAI's current completion models refuse it: use --add-original first, or a server "
                "that scores prompts (vLLM, server.py)")


def with_original(client, asked, ranked, prompt, ex):
    """The ranking with the dataset's own answer: sorted in by its score ("scored") or placed first ("first",
    its score unknown)."""
    original = ex.get("output", "").strip()
    if not original:
        raise ReplyError("add_original is set but the example has no output")
    texts = [text for text, _ in ranked]
    if asked.add_original == "first":
        return [(original, None)] + [pair for pair in ranked if pair[0] != original]
    if original in texts:  # a sample equals it: already scored
        return ranked
    scored = ranked + [(original, original_score(client, prompt, ex["output"]))]
    return sorted(scored, key=by_score, reverse=True)


def original_score(client, prompt, output):
    """The mean token log-prob of the dataset's own response, echoed by the teacher after the prompt."""
    url = client.base_url + "/completions"
    # as the training text (data.encode_prompt_response): no separator
    full = prompt + output
    try:
        answer = client.request(*original_request(prompt, output))
    # a property of the server, not of this item: stop before paying for more
    except TeacherError as e:
        if e.status and 400 <= e.status < 500 and "echo" in str(e).lower():
            raise client.stop(RunError(f"{one_line(e)}: {ECHO_REFUSED}")) from None
        raise
    offsets = get_field(answer, "choices.0.logprobs.text_offset", url)
    logprobs = get_field(answer, "choices.0.logprobs.token_logprobs", url)
    # a token holding any response character is the response's, as in data.encode_prompt_response
    try:
        ends = list(offsets[1:]) + [len(full)]
        picked = [float(lp) for at, end, lp in zip(offsets, ends, logprobs)
                  if end > len(prompt) and at < len(full) and lp is not None]
    except (TypeError, ValueError):
        raise ReplyError(f"{url}: malformed echo log-probs") from None
    if not picked:
        raise ReplyError(f"{url}: no log-probs for the original response's tokens")
    return mean_logprob(picked)


def original_request(prompt, output):
    """(path, params) of the request that scores the dataset's own response (--add-original scored): the
    training text (data.encode_prompt_response: no separator) echoed with its log-probs, nothing generated."""
    return "/completions", dict(prompt=prompt + output, echo=True, max_tokens=0, logprobs=1)


# ---- 6. where the teacher's reference answer ends in its ranking reply

# How replies number their five steps: the marker of step k at the start of a line, after markdown ("**", "#",
# ">", "-"); "(k)" also inside a line, as the prompt itself writes them. Ordinals as in the authors' prompt
# ("First, ... Second, ... Last, ...").
_LINE = r"^[ \t>*#_-]*"
_ORDINALS = {1: r"first(?:ly)?", 2: r"second(?:ly)?", 3: r"third(?:ly)?", 4: r"fourth(?:ly)?",
             5: r"fifth(?:ly)?|last(?:ly)?|finally"}
STEP_MARKERS = {
    "(k)": lambda k: rf"(?:{_LINE}|(?<=\s))\({k}\)",
    "k)": lambda k: rf"{_LINE}{k}\)",
    "k.": lambda k: rf"{_LINE}{k}\.(?!\d)",
    "step k": lambda k: rf"{_LINE}step[ \t]*{k}\b",
    "ordinal": lambda k: rf"{_LINE}(?:{_ORDINALS[k]})\b",
}
# Words that name what steps 3-5 are about, to tell a step from an item of a list inside the answer.
STEP_TOPICS = {3: r"duplicat|identical|repeat|same|distinct|unique|differ|cop(?:y|ies)|redundan",
               4: r"scor|rat(?:e|ing)", 5: r"rank"}
# "## Duplicates", "**Duplicates:** none"
_HEADING = r"^[ \t]*(?:#{1,6}[ \t]+(\S[^\n]*)|\*\*([^*\n]+)\*\*)"


def reference_answer(reply, n):
    """(the teacher's reference answer, None) or (None, why there is none): the text after "###Response n" up
    to where the reply's next step begins, in the numbering style the reply uses for its steps (found from the
    marker just before the answer: "(2)", "2.", "2)", "**Step 2:**", "Second," or a heading), and never past
    the ranking. A list inside the answer stays whole: a marker that continues a numbering begun inside the
    answer is an item of it, unless it names its step's topic (duplicates, scores, rank). When the end cannot
    be told unambiguously, there is no reference (the ranking is still usable without it)."""
    # code blocks hold no step markers
    masked = re.sub(r"```.*?(?:```|\Z)", _blanked, reply, flags=re.S)
    head = re.search(rf"#+[ \t]*response[ \t]*{n}\b(?:[ \t]*\([^)\n]*\))?[ \t*:]*", masked, re.I)
    if not head:
        return None, f"no '###Response {n}' in the reply"
    begin = head.end()
    lowered = masked.lower()
    key = "rank:" if "rank:" in lowered else "ranking:"
    # the ranking's line is not the answer's (nor a ranking on the answer's line)
    end = lowered.rfind(key)
    line_start = masked.rfind("\n", 0, end) + 1
    if end < begin:
        end = len(masked)
    elif line_start >= begin:
        end = line_start
    cut, problem = _step_after_reference(masked, head.start(), begin, end)
    if problem:
        return None, problem
    # a closing rule
    text = re.sub(r"(?:\n[ \t]*[-*_=]{3,}[ \t]*)+\Z", "", reply[begin:cut].rstrip()).strip()
    return (text, None) if text else (None, "the reference answer is empty")


def _blanked(match):
    """A match's text as spaces, its line breaks kept: positions stay where they were."""
    return re.sub(r"[^\n]", " ", match.group())


def _line_end(text, at):
    """Where the line holding position `at` ends (the text's end for the last line)."""
    end = text.find("\n", at)
    return len(text) if end < 0 else end


def _heading_level(match):
    """A markdown heading's level ("## x": 2); a bold line ("**x**") ranks below every heading."""
    heading = match.group().strip()
    return len(heading) - len(heading.lstrip("#")) or 7


def _step_before(after, at):
    """The number of the last step marker before position `at` (0: none)."""
    earlier = [(q, k) for q, k in after if q < at]
    return max(earlier, default=(0, 0))[1]


def _step_after_reference(masked, head_at, begin, end):
    """(where the step after the reference answer begins, None), or (None, why it cannot be told)."""
    after = _numbered_steps(masked, head_at, begin, end)
    if after is None:
        return _step_by_headings(masked, head_at, begin, end)
    for step in (3, 4, 5):
        places = [at for at, k in after if k == step]
        if not places:
            continue
        # a marker that continues a numbering begun inside the answer is an item of a list
        fresh = [at for at in places if _step_before(after, at) != step - 1]
        topical = [at for at in places if _names_topic(masked, at, step)]
        both = [at for at in fresh if at in topical]
        # one fresh marker, else one that names the step's topic, else one that is both
        for chosen in (fresh, topical, both):
            if len(chosen) == 1:
                return chosen[0], None
        return None, (f"cannot tell where the reference answer ends: {len(places)} place(s) "
                      f"could begin step {step}")
    return end, None


def _names_topic(masked, at, step):
    """Whether the line at `at` names what step `step` is about (STEP_TOPICS)."""
    line = masked[at:_line_end(masked, at)]
    return re.search(STEP_TOPICS[step], line, re.I) is not None


def _numbered_steps(masked, head_at, begin, end):
    """The (position, step number) markers after the answer, in the numbering style whose step-1 or step-2
    marker comes nearest before the answer; None when no style numbers steps on both sides of it."""
    best_at = -1
    best = None
    for marker in STEP_MARKERS.values():
        found = sorted((m.start(), k) for k in range(1, 6)
                       for m in re.finditer(marker(k), masked, re.I | re.M))
        before = [(at, k) for at, k in found if at < head_at]
        after = [(at, k) for at, k in found if begin <= at < end]
        if not before or before[-1][1] not in (1, 2):
            continue
        if any(k >= 3 for _, k in after) and before[-1][0] > best_at:
            best_at = before[-1][0]
            best = after
    return best


def _step_by_headings(masked, head_at, begin, end):
    """Where a reply that marks its steps with headings ("## Duplicates") begins the next one: the first
    heading after the answer, at its heading's level or above, that names a later step's topic."""
    headings = [m for m in re.finditer(_HEADING, masked, re.M)
                if not re.search(r"response\s*\d", m.group(), re.I)]
    before = [m for m in headings if m.start() < head_at]
    top = _heading_level(before[-1]) if before else 0
    after = [m for m in headings if begin <= m.start() < end and _heading_level(m) <= top]
    topics = "|".join(STEP_TOPICS.values())
    named = [m.start() for m in after if re.search(topics, m.group(1) or m.group(2), re.I)]
    if named:
        return named[0], None
    scores_or_duplicates = r"^\W*response\s*\d+\s*:\s*\[?\d|duplicat"
    if after or re.search(scores_or_duplicates, masked[begin:end], re.I | re.M):
        return None, "no step markers after the reference answer to tell where it ends"
    return end, None  # nothing but the answer up to the ranking


# ---- 7. the fast path: the diversity rule for many prompts in batches

# Rows sampled together where batch_size is "auto" and the device reports no free memory (a CPU): a CPU's
# decode step costs in proportion to its rows, so more buys little there.
STUDENT_BATCH_ROWS = 64


def sample_diverse(model, tok, prompts, n=4, temperature=0.8, max_new_tokens=256, tries=3, threshold=0.8,
                   generators=None, batch_size="auto", on_done=None):
    """For each prompt, what diverse_samples (section 2, the diversity rule) gives it, with the prompts
    sampled together, shortest first, in model.generate calls of at most batch_size rows (n per prompt; a row
    leaves the batch when it ends): on a GPU a decode step costs about the same for 4 rows as for 128. "auto":
    the rows whose KV caches fit the device's free memory (model.auto_batch_rows; on a CPU,
    STUDENT_BATCH_ROWS). A prompt that must be sampled again waits until a full batch of prompts needs the
    same round (or no new prompt is left), so retries fill batches too. generators: None (torch's default), or
    per prompt a list of n torch.Generators, one per row: a row's draws then depend only on its own generator,
    so a prompt's result does not depend on which prompts share its batch, and equals diverse_samples' with
    the same generators. on_done(i, result) is called as soon as prompt i's result is final (sample_candidates
    caches it there); returns the results in prompt order."""
    ids = [tok.encode(prompt, bos=True) for prompt in prompts]
    budget = [answer_budget(model.args.max_seq_len, p, max_new_tokens) for p in ids]
    best = [None] * len(prompts)
    fresh = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    waiting = [[] for _ in range(tries)]  # waiting[r]: prompts due for round r + 1
    if batch_size == "auto":
        batch_size = student_batch_rows(model, ids, budget)
    per_batch = max(1, batch_size // n)
    while fresh or any(waiting):
        r = next_round(fresh, waiting, per_batch)
        queue = waiting[r] if r else fresh
        group = queue[:per_batch]
        queue[:] = queue[per_batch:]
        t = round_temperature(temperature, r)
        # one generate call per token budget
        for tokens in sorted({budget[i] for i in group}):
            batch = [i for i in group if budget[i] == tokens]
            rows = [generators[i][s] for i in batch for s in range(n)] if generators else None
            outs, _ = generate(model, [ids[i] for i in batch], tokens, temperature=t, eos_id=tok.stop_ids,
                               generator=rows, num_samples=n, batch_size=len(batch) * n)
            for k, i in enumerate(batch):
                texts, finished = decoded_answers(tok, outs[k * n:(k + 1) * n])
                best[i], diverse = more_diverse(best[i], texts, finished, t, r, threshold)
                if diverse or r + 1 == tries:
                    if on_done:
                        on_done(i, best[i])
                else:
                    waiting[r + 1].append(i)
    return best


def next_round(fresh, waiting, per_batch):
    """The round to sample next (0: new prompts): the latest round with a full batch due, or any due once no
    new prompt is left; its prompts are the nearest to done."""
    tries = len(waiting)
    full = [r for r in range(1, tries) if len(waiting[r]) >= per_batch]
    last = [r for r in range(1, tries) if waiting[r] and not fresh]
    return max(full + last, default=0)


def student_batch_rows(model, ids, budget):
    """Rows that sample together under --student-batch-size auto: as many as fit in the device's free memory
    (model.auto_batch_rows), STUDENT_BATCH_ROWS on a CPU."""
    longest = max(map(len, ids), default=1)
    slots = max((len(p) + b for p, b in zip(ids, budget)), default=1)
    rows = auto_batch_rows(model, slots, longest, STUDENT_BATCH_ROWS)
    log.info("student: %d rows sample together (--student-batch-size auto)", rows)
    return rows


# ---- 8. the student's samples on disk: their cache and what made them

def sample_candidates(model, tok, examples, cache_path, n=4, temperature=0.8, max_new_tokens=256, tries=3,
                      seed=0, *, student, batch_size="auto"):
    """{id: sample_diverse(...)} for every example, sampled batch_size rows at a time. Each finished item is
    appended to cache_path (JSONL) and read back on a re-run with the same prompt, settings and student (its
    identity: producer_identity), so a killed run does not sample again and another checkpoint never reuses
    them. Row s of an item draws from its own generator seeded from (seed, item id, s): an item's samples do
    not depend on where a run was killed nor on batch_size."""
    settings = sample_settings(n, temperature, max_new_tokens, tries, seed, student, tok.stop_ids)
    samples = StudentSamples(examples, cache_path, settings)
    todo = samples.todo
    device = model.tok_embeddings.weight.device
    progress = data.Progress("student sampling", len(todo), log.info)

    def keep(i, best):
        samples.keep(*todo[i], best)
        progress.advance()

    generators = [[row_generator(seed, item_id, s, device) for s in range(n)] for item_id, _ in todo]
    sample_diverse(model, tok, [prompt for _, prompt in todo], n, temperature, max_new_tokens, tries,
                   generators=generators, batch_size=batch_size, on_done=keep)
    return samples.result


class StudentSamples:
    """One run's student cache: result ({id: its cached sample, or None}, in the examples' order), todo (the
    (id, prompt) of the items still to sample) and keep(), which appends a finished item to the cache and the
    result at once (thread-safe: a server's items finish on the client's workers)."""

    def __init__(self, examples, cache_path, settings):
        self.settings = settings
        self.log = student_log(examples, cache_path, settings)
        self.result, self.todo = {}, []
        for item_id, _, prompt in _items(examples):
            self.result[item_id] = self.log.kept.get(item_id)
            if item_id not in self.log.kept:
                self.todo.append((item_id, prompt))
        self.lock = threading.Lock()
        others = len(self.log.made_otherwise & {item_id for item_id, _ in self.todo})
        if others:
            log.info("%s: %d item(s) have samples from another student, server, prompt or settings: sampled "
                     "again", cache_path, others)

    def keep(self, item_id, prompt, best):
        """Item item_id's samples (diversity_rule's result) into the cache and the result."""
        with self.lock:
            self.result[item_id] = dict(id=item_id, prompt=prompt, settings=self.settings, **best)
            self.log.keep([self.result[item_id]])


def row_generator(seed, item_id, row, device):
    """Row `row` of an item draws from its own generator, seeded from (seed, item id, row): its samples depend
    on neither batch_size nor where a run was killed."""
    digest = hashlib.sha256(f"{seed}:{item_id}:{row}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:6], "little"))


def sample_settings(n, temperature, max_new_tokens, tries, seed, student, stop_ids, server=None):
    """What makes a student's samples what they are: a cached sample is used only under the same settings.
    server: None (drawn here by model.generate), or {"base_url", "model"} of the server that drew them."""
    if server is None:
        return dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, tries=tries, seed=seed,
                    student=student, row_seeds="sha256(seed:id:row)", stop_ids=stop_ids)
    return dict(n=n, temperature=temperature, max_new_tokens=max_new_tokens, tries=tries, seed=seed,
                student=student, server=server, request_seeds="sha256(seed:id:round r)", stop_ids=stop_ids)


def sample_key(settings, prompt):
    """What made a student's samples: its settings (sample_settings) and the prompt."""
    return json.dumps([settings, prompt], sort_keys=True)


def sample_made_by(entry):
    """The key a cached sample was made under (None: the line holds no sample)."""
    settings = entry.get("settings")
    return sample_key(settings, entry.get("prompt")) if isinstance(settings, dict) else None


def student_log(examples, cache_path, settings):
    """The student cache (data.KeptLog): the samples it holds for the same prompt and settings."""
    keys = {item_id: sample_key(settings, prompt) for item_id, _, prompt in _items(examples)}
    return data.KeptLog(cache_path, keys, sample_made_by, log.warning)


def is_checkpoint(folder):
    """Whether folder holds a checkpoint (Hugging Face's config.json or Meta's params.json)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "params.json"))


def producer_identity(checkpoint_dir, tokenizer_path):
    """What produces a model's text: its checkpoint (checkpoint.checkpoint_identity), its tokenizer's
    sha256."""
    return {"checkpoint": checkpoint_identity(checkpoint_dir), "tokenizer": data.file_sha256(tokenizer_path)}


# ---- 9. the student's samples from a server: vLLM (or server.py) over the student checkpoint

def sample_candidates_served(client, tok, examples, cache_path, n=4, temperature=0.8, max_new_tokens=256,
                             tries=3, seed=0, *, student, context_length):
    """sample_candidates' result, each round of the diversity rule drawn by the OpenAI-compatible server that
    `client` asks (/completions, n choices a request), not by a model loaded here: client.max_workers items
    at once, each request retried and cached by the client. The cache keys the samples by the student, as
    sample_candidates does, and by the server's base URL and model name. Round r of an item sends the seed
    round_seed(seed, item id, r). context_length: the student's, so that no answer is asked more tokens than
    fit after its prompt (as answer_budget). An item the server fails is left out of the result (None) and
    named in the log; ranking lists it among the failures."""
    server = {"base_url": client.base_url, "model": client.model}
    settings = sample_settings(n, temperature, max_new_tokens, tries, seed, student, tok.stop_ids, server)
    samples = StudentSamples(examples, cache_path, settings)
    draw = functools.partial(served_item, client, tok, samples, context_length)
    client.map(draw, samples.todo, "student sampling", failed=is_failure)
    return samples.result


def served_item(client, tok, samples, context_length, item):
    """("done", samples) of one item under the diversity rule, its rounds drawn by the server and kept in the
    cache, or ("failed", why); a RunError stops the run."""
    item_id, prompt = item
    settings = samples.settings
    budget = answer_budget(context_length, tok.encode(prompt, bos=True), settings["max_new_tokens"])
    sample_round = functools.partial(served_round, client, settings, item_id, prompt, budget)
    try:
        best = diversity_rule(sample_round, settings["temperature"], settings["tries"])
    except RunError:
        raise
    except (ReplyError, TeacherError) as e:
        log.warning("student sampling: item %s failed: %s", item_id, one_line(e))
        return "failed", str(e)
    samples.keep(item_id, prompt, best)
    return "done", best


def served_round(client, settings, item_id, prompt, budget, r, temperature):
    """Round r of an item's samples from the server -> (texts, finished), as generated_round."""
    if budget == 0:  # no room after the prompt: empty and unfinished, as model.generate gives them
        return [""] * settings["n"], [False] * settings["n"]
    seed = round_seed(settings["seed"], item_id, r)
    path, params = student_request(prompt, settings["n"], temperature, budget, settings["stop_ids"], seed)
    answer = client.request(path, params)
    return served_answers(answer, settings["n"], client.base_url + path)


def student_request(prompt, n, temperature, max_tokens, stop_ids, seed):
    """(path, params) of one round of the student's samples: the Alpaca prompt as text (the server adds BOS,
    as tok.encode(prompt, bos=True)), n choices at the round's temperature and top_p 1 (model.generate's
    sampling), ended by the student's stop ids (vLLM's stop_token_ids; a server that ignores it stops at its
    own EOS) or after max_tokens."""
    return "/completions", dict(prompt=prompt, n=n, temperature=temperature, top_p=1, max_tokens=max_tokens,
                                stop_token_ids=stop_ids, seed=seed)


def round_seed(seed, item_id, r):
    """The seed of an item's round r on a server, from (seed, item id, r): a re-run asks the same requests."""
    digest = hashlib.sha256(f"{seed}:{item_id}:round {r}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def served_answers(answer, n, url):
    """(texts, finished) of a /completions answer's n choices: the text as the server decoded it, stripped as
    decoded_answers strips; finish_reason "length" is an unfinished answer, as a local one that hit the
    budget."""
    choices = get_field(answer, "choices", url)
    if not isinstance(choices, list) or len(choices) != n:
        raise ReplyError(f"{url}: {len(choices) if isinstance(choices, list) else 0} choice(s) for n={n}; "
                         "the student's samples need a server that returns n choices a request (vLLM, "
                         "server.py)")
    texts = [str(get_field(answer, f"choices.{i}.text", url)).strip() for i in range(n)]
    return texts, [choices[i].get("finish_reason") != "length" for i in range(n)]


def preflight_served(client, n, stop_ids):
    """The pre-flight of a server that answers for a checkpoint (the student's samples here, eval.py's
    --served answers): one answer of one token with the options the run sends (n choices, stop_token_ids, a
    seed); it must name the model asked for and return n choices. A server that cannot answer, answers as
    another model or caps n stops the run (RunError)."""
    answer = client.check(chat=False, n=n, temperature=1.0, top_p=1, stop_token_ids=stop_ids, seed=0)
    where = f"pre-flight check of the served model '{client.model}' at {client.base_url}"
    named = answer.get("model")
    if named is not None and named != client.model:
        raise RunError(f"{where}: it answers as model '{named}'; serve the checkpoint under the name asked "
                       "for")
    try:
        served_answers(answer, n, client.base_url + "/completions")
    except (ReplyError, TeacherError) as e:
        raise RunError(f"{where}: {one_line(e)}") from None


def context_length(folder, tok):
    """A checkpoint's context length in tokens, from its config.json or params.json (no weights read)."""
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        return args_from_hf_config(config).max_seq_len
    return args_from_meta_params(os.path.join(folder, "params.json"), vocab_size=tok.vocab_size).max_seq_len


# ---- 10. --dry-run: the requests a run would send, counted and priced, never sent

def token_counter(tokenizer_path=None):
    """(count(text) -> tokens, how they are counted): with a tokenizer that tokenizer.py reads, as server.py
    counts a prompt (BOS included); else estimated at 4 characters a token (OpenAI's rule of thumb for English
    text), and said so."""
    if tokenizer_path:
        tok = Tokenizer(tokenizer_path)
        return (lambda text: len(tok.encode(text, bos=True))), f"counted with {tok.path}"
    return (lambda text: -(-len(text) // 4)), "estimated at 4 characters a token (no --count-tokenizer)"


class DryRun:
    """The requests a run would send, added one by one as the run would build them, and never sent: how many,
    which of them the cache holds (paid before), their prompt tokens (chat messages laid out as server.py lays
    them out: an API's own chat template adds a few tokens a request) and the most completion tokens they may
    cost."""

    def __init__(self, client, tokenizer_path=None):
        self.client = client
        self.count, self.counted_by = token_counter(tokenizer_path)
        self.requests = self.cached = self.prompt_tokens = self.completion_tokens = 0

    def add(self, path, params, max_completion_tokens, unknown_prompt_tokens=0):
        """One request; unknown_prompt_tokens: what its prompt will hold beyond params' text (candidates not
        sampled yet, as an upper bound)."""
        if self.client.is_cached(path, params):
            self.cached += 1
            return
        text = chat_prompt(params["messages"]) if "messages" in params else params["prompt"]
        self.requests += 1
        self.prompt_tokens += self.count(text) + unknown_prompt_tokens
        self.completion_tokens += max_completion_tokens

    def report(self, title, prompt_note="", completion_note="", price_input=None, price_output=None):
        """The dry run's lines: requests, tokens, cost at the prices per 1M tokens (when given)."""
        notes = "; ".join(note for note in (prompt_note, self.counted_by) if note)
        lines = [f"{title}: dry run, nothing sent",
                 f"  requests:          {self.requests:,} to send, {self.cached:,} in the cache "
                 "(paid before)",
                 f"  prompt tokens:     {self.prompt_tokens:,} to send ({notes})",
                 f"  completion tokens: at most {self.completion_tokens:,}" +
                 (f" ({completion_note})" if completion_note else "")]
        if price_input is not None and price_output is not None:
            paid_in = self.prompt_tokens / 1e6 * price_input
            paid_out = self.completion_tokens / 1e6 * price_output
            prices = f"at ${price_input:g} / ${price_output:g} per 1M tokens"
            lines.append(f"  cost:              at most ${paid_in:,.2f} input + ${paid_out:,.2f} output = "
                         f"${paid_in + paid_out:,.2f} ({prices})")
        else:
            lines.append("  cost:              give --price-per-1m-input and --price-per-1m-output")
        lines.append(f"  before the run:    1 pre-flight request ({self.count(PREFLIGHT_TEXT)} prompt "
                     "tokens, 1 completion token)")
        return "\n".join(lines)


def dry_run_probabilistic(client, examples, n=4, max_tokens=256, temperature=1.0, chat=False,
                          add_original=None, tokenizer_path=None, prices=(None, None)):
    """build_probabilistic's requests, counted and not sent (the first request of each item; top-ups and the
    original answer's scoring as notes, since they depend on the answers)."""
    dry = DryRun(client, tokenizer_path)
    items = _items(examples)
    for item in items:
        dry.add(*probabilistic_request(item, 0, n, max_tokens, temperature, chat), n * max_tokens)
        # sent unless a sample equals the original: an upper bound
        if add_original == "scored":
            dry.add(*original_request(item[2], item[1]["output"]), 0)
    prompt_note = f"{len(items):,} instructions" + (
        ", each with the request that scores its original answer (skipped where a sample equals it)"
        if add_original == "scored" else "")
    completion_note = (f"{n} choices x --max-tokens {max_tokens} a request; a server that returns fewer "
                       f"usable choices than --n gets up to {REQUESTS_PER_SAMPLE * n - 1} more requests an "
                       "item, 1 choice each, not counted here")
    return dry.report("teacher.py probabilistic", prompt_note, completion_note, *prices)


def dry_run_contextual(client, examples, samples, n=4, student_max_tokens=256, temperature=1.0,
                       max_tokens=2048, tokenizer_path=None, prices=(None, None)):
    """build_contextual's requests, counted and not sent: exact for items whose student samples are in the
    student cache (samples), estimated for the others: each of the n candidates counted at student_max_tokens
    tokens, the most a sample holds (an upper bound, up to how the teacher's tokenizer splits the text)."""
    dry = DryRun(client, tokenizer_path)
    unknown = 0
    for item_id, _, prompt in _items(examples):
        if item_id in samples:
            candidates = samples[item_id]["candidates"]
            dry.add(*ranking_request(prompt, candidates, temperature, max_tokens), max_tokens)
        else:
            unknown += 1
            dry.add(*ranking_request(prompt, [""] * n, temperature, max_tokens), max_tokens,
                    unknown_prompt_tokens=n * student_max_tokens)
    prompt_note = (f"estimated: {unknown:,} of {len(examples):,} instructions not sampled yet by the "
                   f"student, each of their {n} candidates counted at --student-max-tokens "
                   f"{student_max_tokens}, the most a sample holds in the student's tokens" if unknown else
                   f"all {len(examples):,} instructions' student samples are in the cache")
    completion_note = f"--teacher-max-tokens {max_tokens} a request"
    return dry.report("teacher.py contextual", prompt_note, completion_note, *prices)


# ---- 11. the command line

def preflight(args, client):
    """The pre-flight request of a probabilistic or contextual run, with the endpoint and options it sends."""
    if args.command == "contextual":
        return client.check(chat=True, temperature=args.teacher_temperature)
    if args.chat:
        return client.check(chat=True, temperature=args.temperature, logprobs=True)
    echo = dict(echo=True) if args.add_original == "scored" else {}
    return client.check(chat=False, refused_hints={"echo": ECHO_REFUSED}, temperature=args.temperature,
                        logprobs=1, **echo)


def dry_run(args, client, examples):
    """The dry run's report of a probabilistic or contextual command line."""
    prices = (args.price_per_1m_input, args.price_per_1m_output)
    if args.command == "probabilistic":
        return dry_run_probabilistic(client, examples, args.n, args.max_tokens, args.temperature, args.chat,
                                     args.add_original, args.count_tokenizer, prices)
    # what the student sampled already, if it exists yet (in the pipeline: not before Tuna_p)
    samples = {}
    if is_checkpoint(args.student):
        tok = Tokenizer(args.tokenizer or args.student)
        samples = student_log(examples, student_cache_path(args), student_settings(args, tok)).kept
    return dry_run_contextual(client, examples, samples, args.n, args.student_max_tokens,
                              args.teacher_temperature, args.teacher_max_tokens, args.count_tokenizer, prices)


def student_cache_path(args):
    """Where contextual ranking keeps the student's samples: --student-cache, else OUT.student.jsonl."""
    return args.student_cache or args.out + ".student.jsonl"


def student_settings(args, tok):
    """What makes the student's samples under this command line (sample_settings), the server included."""
    server = {"base_url": args.student_base_url.rstrip("/"), "model": args.student_model} \
        if args.student_base_url else None
    return sample_settings(args.n, args.student_temperature, args.student_max_tokens, args.tries, args.seed,
                           producer_identity(args.student, tok.path), tok.stop_ids, server)


def student_samples(args, tok, examples):
    """The student's samples for contextual ranking: from the server at --student-base-url (checked first),
    else drawn here by --student loaded on --device."""
    identity = producer_identity(args.student, tok.path)
    options = (args.n, args.student_temperature, args.student_max_tokens, args.tries, args.seed)
    if args.student_base_url:
        client = student_client(args, student_requests_path(args, student_settings(args, tok)))
        preflight_served(client, args.n, tok.stop_ids)
        return sample_candidates_served(client, tok, examples, student_cache_path(args), *options,
                                        student=identity, context_length=context_length(args.student, tok))
    student = load_checkpoint(args.student, args.device,
                              dtype=torch.float32 if args.device == "cpu" else None)
    return sample_candidates(student, tok, examples, student_cache_path(args), *options, student=identity,
                             batch_size=args.student_batch_size)


def student_requests_path(args, settings):
    """The student server's request cache: beside the student cache, one file per student checkpoint and
    server (a request names only the served model, so a retrained checkpoint served under the same name must
    not read an older one's answers back)."""
    producer = json.dumps([settings["student"], settings["server"]], sort_keys=True)
    return f"{student_cache_path(args)}.requests-{hashlib.sha256(producer.encode()).hexdigest()[:12]}.jsonl"


def student_client(args, cache_path):
    """The TeacherClient of the student's server (--student-base-url): the run's workers, timeout and
    retries, no rate limit."""
    return TeacherClient(args.student_base_url, args.student_model, args.student_api_key_env, cache_path,
                         args.timeout, args.max_retries, args.workers)


def client_from_args(args, cache_path):
    """The TeacherClient the command line asks for, with its cache at cache_path (None: no cache)."""
    return TeacherClient(args.base_url, args.model, args.api_key_env, cache_path, args.timeout,
                         args.max_retries, args.workers, args.rpm)


def command_inputs(args):
    """The files and folders a run reads, by the flag that names them (None: not given)."""
    flags = ("data", "student", "tokenizer", "count_tokenizer")
    return {"--" + flag.replace("_", "-"): getattr(args, flag, None) for flag in flags}


def command_caches(args):
    """The append-only caches a run reads back and adds to, by flag: the teacher's answers and the student's
    samples (contextual)."""
    caches = {"--cache": args.cache or args.out + ".cache.jsonl"}
    if args.command == "contextual":
        caches["--student-cache"] = student_cache_path(args)
    return caches


def failures_path(args):
    """Where the items that gave no record are listed: --failures, else OUT.failures.jsonl."""
    return args.failures or args.out + FAILURES_SUFFIX


def refuse_outputs_over_inputs(args):
    """Every file a run writes apart from every input it reads (data.refuse_output_over_inputs), before
    anything is written: the caches apart from the inputs; OUT and the failures file, which are replaced
    whole, apart from the caches too, whose paid answers they would replace."""
    inputs = command_inputs(args)
    caches = command_caches(args)
    for output in (args.out, failures_path(args)):
        data.refuse_output_over_inputs(output, {**inputs, **caches})
    for cache in caches.values():
        data.refuse_output_over_inputs(cache, inputs)


def refuse_replacing(args):
    """An existing OUT is rewritten only with --resume (from the caches; a ranked file of the same kind) or
    --overwrite, and only when it is a ranked JSONL file; an existing failures file only when it is one of
    teacher.py's. Anything else a user may have named by mistake (an Alpaca file, a folder, a symlink) is
    refused by name and left as it is."""
    if os.path.lexists(args.out):
        if not (args.resume or args.overwrite):
            raise ValueError(f"{args.out} already exists: pass --resume to rebuild it from the caches (what "
                             "was asked and sampled before is read back, not paid for again) or --overwrite "
                             "to replace it")
        first = first_record_written_here(args.out, "--out", "a ranked JSONL file",
                                          ("id", "prompt", "candidates"))
        source = first.get("source")
        kind = source.get("kind") if isinstance(source, dict) else None
        if not args.overwrite and kind not in (None, args.command):
            raise ValueError(f"--resume: {args.out} holds {kind} ranking, not {args.command}: pass "
                             "--overwrite to replace it")
    if os.path.lexists(failures_path(args)):
        first_record_written_here(failures_path(args), "--failures", "a failures file",
                                  ("id", "kind", "error"))


def first_record_written_here(path, flag, what, fields):
    """The first line of a file teacher.py writes, as a dict ({} for an empty file): a plain file, not a
    symlink, whose first line is a JSON object with `fields`; anything else is a ValueError naming it."""
    refusal = (f"{flag} {path} is not {what} of teacher.py (a plain file whose JSON lines hold "
               f"{', '.join(fields)}), so it is left as it is: choose another {flag} or remove it yourself")
    if os.path.islink(path) or not os.path.isfile(path):
        raise ValueError(refusal)
    with open(path, "rb") as f:
        # a line at most this long: a large binary file holds no line to read whole
        head = f.readline(1 << 24)
    if not head:
        return {}
    try:
        first = json.loads(head)
    # not UTF-8, not JSON (both ValueErrors), or nested too deep
    except (ValueError, RecursionError):
        first = None
    if not isinstance(first, dict) or not set(fields) <= set(first):
        raise ValueError(refusal)
    return first


def argument_parser():
    """teacher.py's command line: the probabilistic and contextual commands and their options."""
    description = "Tuna ranking data from a teacher LLM over an OpenAI-compatible API (paper, section 2)."
    parser = argparse.ArgumentParser(prog="teacher.py", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"probabilistic": "rank N teacher samples per instruction by mean token log-prob (Tuna_p data)",
             "contextual": "the student samples N responses, the teacher ranks them (Tuna_c data)"}
    for name, text in helps.items():
        p = commands.add_parser(name, help=text, description=text)
        p.add_argument("--data", required=True, help="Alpaca JSON list of {instruction, input, output}")
        p.add_argument("--out", required=True, help="ranked JSONL to write (atomically)")
        p.add_argument("--failures", help="failures JSONL (default: OUT.failures.jsonl)")
        p.add_argument("--cache", help="append-only request cache JSONL (default: OUT.cache.jsonl)")
        caches = "request cache gives back what was asked" if name == "probabilistic" else \
            "request and student caches give back what was asked and sampled"
        p.add_argument("--resume", action="store_true", help=f"rebuild an existing OUT from the caches: the "
                       f"{caches} before, so a rerun pays nothing twice (OUT: a ranked JSONL file of the "
                       "same kind only)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a ranked JSONL "
                       "file only); the caches are read as always")
        p.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1 or "
                       "http://127.0.0.1:8000/v1")
        p.add_argument("--model", required=True, help="teacher model name")
        p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API "
                       "key (may be unset for a local server)")
        p.add_argument("--n", type=int, default=4, help="candidates per instruction")
        p.add_argument("--limit", type=int, help="only the first LIMIT examples")
        p.add_argument("--workers", type=int, default=4, help="concurrent requests")
        p.add_argument("--rpm", type=float, help="at most this many requests per minute")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
        p.add_argument("--max-retries", type=int, default=6)
        p.add_argument("--retry-failures", action="store_true",
                       help="items whose cached answers were unusable get one new request each (a new seed)")
        data.add_cost_arguments(p, "read the data, build every request, print how many requests and "
                                "tokens the run would send and what they cost; send nothing")
        p.add_argument("--preflight-only", action="store_true", help="only check the server with one cheap "
                       "request (reachable, key, model, endpoint and options), then exit")
        if name == "probabilistic":
            p.add_argument("--chat", action="store_true", help="use /chat/completions (default /completions)")
            p.add_argument("--max-tokens", type=int, default=256)
            p.add_argument("--temperature", type=float, default=1.0)
            p.add_argument("--add-original", choices=["scored", "first"], help="add the dataset's response: "
                           "scored by the teacher and sorted in (needs /completions echo), or placed first")
        else:
            p.add_argument("--student", required=True, help="student checkpoint folder (SFT or Tuna_p)")
            p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: --student's)")
            p.add_argument("--student-cache", help="finished student samples JSONL (default: "
                           "OUT.student.jsonl)")
            p.add_argument("--student-temperature", type=float, default=0.8)
            p.add_argument("--student-max-tokens", type=int, default=256)
            p.add_argument("--student-batch-size", type=data.rows_option, default="auto", help="rows sampled "
                           "together (N per instruction); more is faster on a GPU while the KV cache fits. "
                           f"auto (default): as many as fit in free GPU memory; {STUDENT_BATCH_ROWS} on a "
                           "CPU")
            p.add_argument("--tries", type=int, default=3, help="sampling rounds of the diversity rule")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--device", default=default_device())
            p.add_argument("--student-base-url", help="sample the student's candidates from this "
                           "OpenAI-compatible server serving --student (/completions), e.g. vLLM at "
                           "http://127.0.0.1:8000/v1, instead of loading --student here; --student's "
                           "tokenizer and identity still key the samples")
            p.add_argument("--student-model", help="the name the student server serves --student under "
                           "(`vllm serve DIR` names it DIR); needed with --student-base-url")
            p.add_argument("--student-api-key-env", default="VLLM_API_KEY", help="environment variable with "
                           "the student server's API key (may be unset)")
            p.add_argument("--teacher-temperature", type=float, default=1.0)
            p.add_argument("--teacher-max-tokens", type=int, default=2048)
            p.add_argument("--drop-reference", action="store_true", help="leave out the teacher's own answer")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if getattr(args, "student_base_url", None) and not args.student_model:
        parser.error("--student-base-url needs --student-model (the name the server serves --student under)")
    # our progress lines only (not every library's INFO chatter, e.g. rouge_score's)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        # rouge_score's absl logging configures the root logger: no second copy there
        log.propagate = False
    try:
        # before anything is written, OUT.lock included: an output over an input would destroy what it reads
        refuse_outputs_over_inputs(args)
        examples = data.read_alpaca(args.data)[:args.limit]
        cache = command_caches(args)["--cache"]
        given = [path for path in (args.cache, getattr(args, "student_cache", None)) if path]
        client_for = functools.partial(client_from_args, args)
        if args.dry_run:
            print(dry_run(args, client_for(cache), examples))
            return 0
        if args.preflight_only:  # writes nothing, so takes no lock
            preflight(args, client_for(None))
            if getattr(args, "student_base_url", None):
                tok = Tokenizer(args.tokenizer or args.student)
                preflight_served(student_client(args, None), args.n, tok.stop_ids)
            return 0
        # one writer per output, and per cache given apart from it
        with contextlib.ExitStack() as locks:
            for path in dict.fromkeys([args.out] + given):
                locks.enter_context(data.lock_output(path))
            # under the lock: no other run changes OUT meanwhile
            refuse_replacing(args)
            client = client_for(cache)
            # the student's files first: a typo is named before any request
            if args.command == "contextual":
                tok = Tokenizer(args.tokenizer or args.student)
                if not is_checkpoint(args.student):
                    raise ValueError(f"--student {args.student}: not a checkpoint folder (no config.json or "
                                     "params.json there)")
            preflight(args, client)  # before any sampling or paid request
            if args.command == "probabilistic":
                build_probabilistic(client, examples, args.out, args.failures, args.n, args.max_tokens,
                                    args.temperature, chat=args.chat, add_original=args.add_original,
                                    retry_failures=args.retry_failures)
                return 0
            samples = student_samples(args, tok, examples)
            build_contextual(client, examples, samples, args.out, args.failures,
                             keep_reference=not args.drop_reference, retry_failures=args.retry_failures,
                             temperature=args.teacher_temperature, max_tokens=args.teacher_max_tokens)
    # each names its file or URL
    except (OSError, ValueError, TeacherError, data.OutputLocked) as e:
        parser.exit(1, f"teacher.py {args.command}: error: {one_line(e)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
