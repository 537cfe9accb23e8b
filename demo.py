"""The whole Tuna method offline on a CPU: SFT, Tuna_p, Tuna_c and Tuna on a built-in
instruction suite.

    python demo.py --out runs/demo              # about 4 minutes on 2 CPU cores
    python demo.py --out runs/demo --size ci    # the test-sized run, about 2 minutes

Every stage runs the command a user would type (tuna.py sft / rank / pipeline, teacher.py
probabilistic / contextual), with the teacher served over HTTP by `server.py`.
What stands in for what:
- a built-in suite of short tasks with checkable answers;
- a tiny "teacher" LLaMA trained on the correct answers (for text-davinci-003);
- a tiny "student" trained on answers that are sometimes wrong (the Alpaca baseline);
- for GPT-4 in contextual ranking, a RULE-BASED JUDGE that checks the known answers,
  named so in every file it touches.
Everything stays in --out: data files, checkpoints with metrics.jsonl, greedy answers,
results.md (the table), results.json and results.svg (each stage's training curves and the
held-out scores). Running it again on the same folder continues where it stopped and
redoes nothing.
"""
import argparse
import functools
import html
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import requests
import torch

import data
import eval as evaluation  # eval.py (renamed here so Python's eval() stays visible)
import model as llama
import teacher
import tokenizer
import tuna
from checkpoint import save_hf_checkpoint
from client import PREFLIGHT_TEXT
from server import BadRequest, backend_server


# The suite: short tasks whose answers can be checked, so the final table can say whether
# ranking helped. Every answer is a function of what the instruction shows (no world
# knowledge), so held-out instructions are new instances of the same tasks. Each task also
# has one plausible wrong answer: the SFT data uses it for a share of the instructions, as
# Alpaca's distilled answers are sometimes wrong.
def spaced(items):
    """Letters or digits as an instruction shows them: "a b c"."""
    return " ".join(items)


# name -> (instruction, correct answer, plausible wrong answer), from random letters or digits
TASKS = {
    "first": lambda ls, ds: (f"What is the first of the letters {spaced(ls)}?",
                             ls[0], ls[-1]),
    "last": lambda ls, ds: (f"What is the last of the letters {spaced(ls)}?",
                            ls[-1], ls[0]),
    "count": lambda ls, ds: (f"How many letters are in {spaced(ls)}?",
                             str(len(ls)), str(len(ls) + 1)),
    "largest": lambda ls, ds: (f"Which is the largest of the digits {spaced(ds)}?",
                               max(ds), ds[0]),
    "smallest": lambda ls, ds: (f"Which is the smallest of the digits {spaced(ds)}?",
                                min(ds), max(ds)),
    "sort": lambda ls, ds: (f"Sort the letters {spaced(ls)} alphabetically.",
                            spaced(sorted(ls)), spaced(ls)),
}

JUDGE = "rule-based-judge-checking-known-answers"  # its name in every data file it touches

# name -> settings (data sizes; model shapes; training); "full" is what the README's command
# runs, "ci" the test-sized variant.
SIZES = {
    "full": dict(train=4000, heldout=300, ranked=2000,
                 dim=64, layers=2, teacher_dim=96, teacher_layers=3,
                 sft_epochs=12, sft_lr=3e-3, rank_lr=1e-3),
    "ci": dict(train=2000, heldout=300, ranked=1000,
               dim=64, layers=2, teacher_dim=96, teacher_layers=3,
               sft_epochs=12, sft_lr=3e-3, rank_lr=1e-3),
}

# The models of the table (name -> folder in --out); the first four are the stages drawn in
# results.svg.
MODELS = {
    "SFT (Alpaca)": "sft",
    "Tuna_p": os.path.join("tuna", "tuna_p"),
    "Tuna_c": "tuna_c",
    "Tuna": os.path.join("tuna", "tuna"),
    "teacher (for reference)": "teacher",
}
# how each drawn stage was trained, in its panel's title
STAGE_NOTES = {
    "SFT (Alpaca)": "one candidate, so loss = MLE term",
    "Tuna_p": "probabilistic ranking, from SFT",
    "Tuna_c": "contextual ranking, from SFT",
    "Tuna": "contextual ranking, from Tuna_p (lr / 10)",
}


# ---- 1. the stages

class DemoError(RuntimeError):
    """A demo that cannot start or go on; the message names the file, stage or URL."""


def main(argv=None):
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="demo.py", description=description)
    parser.add_argument("--out", default="runs/demo",
                        help="folder for every artefact (default: runs/demo); "
                        "running the demo again continues what is there")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="ci: the test-sized variant")
    parser.add_argument("--noise", type=float, default=0.35,
                        help="share of wrong answers in the SFT data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run_demo(args)
    # DataError is a ValueError; each names its file
    except (DemoError, OSError, ValueError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_demo(args):
    """SFT, Tuna_p, Tuna_c and Tuna on the suite, then the held-out table and picture; all in
    --out."""
    began = time.time()
    size = SIZES[args.size]
    out = args.out.rstrip("/")
    path = functools.partial(os.path.join, out)  # path(names...): a file in --out
    stage = functools.partial(run_stage, began)
    teacher_data, heldout = prepare(args, size, out)
    common = ["--resume", "--seed", str(args.seed),
              "--save-every", "0", "--log-every", "25"]
    sft_stages(stage, path, size, common)
    rank = [*common, "--batch-size", "16", "--epochs", "1"]
    limit = ["--limit", str(size["ranked"]), "--workers", "2"]
    probabilistic_stage(stage, path, limit)
    contextual_stages(stage, path, size, teacher_data, rank, limit)
    tuna_c = ["tuna.py", "rank",
              "--init", path("sft"),
              "--data", path("contextual_sft.jsonl"),
              "--out", path("tuna_c"),
              "--lr", str(size["rank_lr"]),
              *rank]
    stage("Tuna_c: ranking training from SFT on the contextual data", tuna.main, tuna_c)
    return write_results(args, out, heldout, began)


def run_stage(began, title, run, argv):
    """One stage: the command a user would type; with --resume a rerun skips a finished one."""
    log_stage(began, title)
    log(f"$ python {' '.join(argv)}")
    try:
        status = run(argv[1:])
    except SystemExit as e:  # argparse and teacher.py exit this way
        status = e.code
    if status != 0:
        raise DemoError(f"stage '{title}' failed; "
                        "fix it and rerun the demo (finished stages are kept)")


def sft_stages(stage, path, size, common):
    """The teacher and the student, each by SFT from its own initial model."""
    sft = ["--lr", str(size["sft_lr"]),
           "--epochs", str(size["sft_epochs"]),
           "--batch-size", "32"]
    teacher_sft = ["tuna.py", "sft",
                   "--init", path("init_teacher"),
                   "--data", path("teacher_data.json"),
                   "--out", path("teacher"),
                   *common, *sft]
    stage("the teacher: SFT on correct answers (it stands for text-davinci-003)",
          tuna.main, teacher_sft)
    student_sft = ["tuna.py", "sft",
                   "--init", path("init_student"),
                   "--data", path("sft_data.json"),
                   "--out", path("sft"),
                   *common, *sft]
    stage("the student: SFT on answers that are sometimes wrong (the Alpaca baseline)",
          tuna.main, student_sft)


def probabilistic_stage(stage, path, limit):
    """The teacher, served over HTTP for this stage only, writes the probabilistic ranking
    data."""
    title = ("probabilistic ranking data: the teacher samples 4 answers over HTTP, "
             "ranked by mean token log-prob")
    process, teacher_url = start_teacher_server(path("teacher"))
    try:
        probabilistic = ["teacher.py", "probabilistic",
                         "--data", path("sft_data.json"),
                         "--out", path("probabilistic.jsonl"),
                         "--base-url", teacher_url,
                         "--model", "demo-teacher",
                         "--max-tokens", "16",
                         "--add-original", "scored",
                         # a rerun of the demo rebuilds the file from teacher.py's caches
                         "--resume",
                         *limit]
        stage(title, teacher.main, probabilistic)
    finally:
        process.kill()


def contextual_stages(stage, path, size, teacher_data, rank, limit):
    """The stages the rule-based judge ranks for: the Tuna pipeline and Tuna_c's contextual
    data."""
    pipeline_title = ("Tuna = Tuna_p (ranking on the probabilistic data, from SFT), "
                      "then contextual ranking on Tuna_p's own samples "
                      "ranked by the RULE-BASED judge (lr / 10, as the authors)")
    contextual_title = ("contextual ranking data for Tuna_c: the SFT student samples 4 answers, "
                        "the RULE-BASED judge ranks them")
    solutions = {e["instruction"]: e["output"] for e in teacher_data}
    judge = start_rule_judge(solutions)
    judge_url = f"http://127.0.0.1:{judge.server_port}/v1"
    # what the pipeline hands on to teacher.py contextual (it gives the URL and model itself)
    sampling_args = ["--student-max-tokens", "16", *limit]
    judge_args = ["--base-url", judge_url, "--model", JUDGE, *sampling_args]
    try:
        pipeline = ["tuna.py", "pipeline",
                    "--init", path("sft"),
                    "--probabilistic-data", path("probabilistic.jsonl"),
                    "--lr-probabilistic", str(size["rank_lr"]),
                    "--lr-contextual", str(size["rank_lr"] / 10),
                    "--instructions", path("sft_data.json"),
                    "--teacher-base-url", judge_url,
                    "--teacher-model", JUDGE,
                    "--teacher-args", " ".join(sampling_args),
                    "--out", path("tuna"),
                    *rank]
        stage(pipeline_title, tuna.main, pipeline)
        contextual = ["teacher.py", "contextual",
                      "--data", path("sft_data.json"),
                      "--student", path("sft"),
                      "--out", path("contextual_sft.jsonl"),
                      "--resume",
                      *judge_args]
        stage(contextual_title, teacher.main, contextual)
    finally:
        judge.shutdown()


def write_results(args, out, heldout, began):
    """Every model's greedy answers to the held-out instructions: results.md, .json and
    .svg."""
    path = functools.partial(os.path.join, out)  # path(names...): a file in --out
    log_stage(began, f"held-out evaluation: greedy answers to {len(heldout)} new instructions")
    results = evaluate_heldout(out, heldout)
    table = results_table(results, args.noise, time.time() - began)
    data.write_atomic(path("results.md"), table)
    data.write_atomic(path("results.json"), json.dumps(results, indent=1))
    curves = {name: read_metrics(path(MODELS[name], "metrics.jsonl")) for name in STAGE_NOTES}
    picture_title = f"size {args.size}, {args.noise:.0%} wrong SFT answers, seed {args.seed}"
    picture = results_svg(curves, results, picture_title)
    data.write_atomic(path("results.svg"), picture)
    print(table, end="")
    log(f"every artefact is in {out}/ (data files, checkpoints with metrics.jsonl, "
        "generations/, results.md, results.json, results.svg)")
    return results


def log_stage(began, title):
    """A stage's heading, with the seconds since the demo began."""
    log(f"\n=== demo [{time.time() - began:5.0f}s] {title}")


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---- 2. the suite and the models

def prepare(args, size, out):
    """The folder's settings (demo.json), the suite's data files, the tokenizer and the
    two untrained models; each written once, atomically, and kept on a rerun. Returns
    the teacher's data and the held-out items."""
    settings = {"size": args.size, "noise": args.noise, "seed": args.seed, **size}
    refuse_other_folder(out)
    refuse_other_settings(os.path.join(out, "demo.json"), settings)
    os.makedirs(out, exist_ok=True)
    student, teacher_data, heldout = suite(size, args.noise, args.seed)
    files = {"demo.json": settings,
             "sft_data.json": student,
             "teacher_data.json": teacher_data,
             "heldout.json": heldout}
    for name, value in files.items():
        file_path = os.path.join(out, name)
        if not os.path.exists(file_path):
            data.write_atomic(file_path, json.dumps(value, indent=1))
    tokenizer_path = os.path.join(out, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
        train_tokenizer(teacher_data, tokenizer_path)
    tok = tokenizer.Tokenizer(tokenizer_path)
    shapes = {"init_student": (size["dim"], size["layers"]),
              "init_teacher": (size["teacher_dim"], size["teacher_layers"])}
    for name, (dim, layers) in shapes.items():
        folder = os.path.join(out, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            write_initial_model(folder, dim, layers, tok, args.seed)
    # the SFT data is read back from sft_data.json by the sft stage
    return teacher_data, heldout


def refuse_other_folder(out):
    """The demo writes only into a folder of its own: a new or empty one, or one holding its
    demo.json. This project's folder (one holding tuna.py: `--out .`), any other non-empty
    folder and a file are refused by name and left as they are."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise DemoError(f"--out {out} is a file, not a folder: choose another --out, e.g. runs/demo")
    if os.path.lexists(os.path.join(out, "tuna.py")):
        raise DemoError(f"--out {out} holds tuna.py: it is this project's folder, not a demo's; "
                        "choose a folder of the demo's own, e.g. runs/demo")
    if os.listdir(out) and not os.path.exists(os.path.join(out, "demo.json")):
        raise DemoError(f"--out {out} is a folder with other files and no demo.json, not a demo's: "
                        "choose a new or empty folder, e.g. runs/demo")


def refuse_other_settings(recorded_path, settings):
    """One demo per folder: never new data under checkpoints trained on old."""
    if not os.path.exists(recorded_path):
        return
    with open(recorded_path, encoding="utf-8") as f:
        recorded = json.load(f)
    if recorded != settings:
        raise DemoError(f"{recorded_path}: this folder holds a demo run with {recorded}, "
                        f"not {settings}; use another --out or the same settings")


def write_initial_model(folder, dim, layers, tok, seed):
    """An untrained LLaMA of this shape, saved with the suite's tokenizer beside it."""
    torch.manual_seed(seed)
    config = llama.ModelArgs(dim=dim, n_layers=layers, n_heads=4, vocab_size=tok.vocab_size,
                             hidden_dim=3 * dim, max_seq_len=256,
                             bos_id=tok.bos_id, eos_id=tok.eos_id)
    save_hf_checkpoint(llama.Transformer(config), folder)
    shutil.copyfile(tok.path, os.path.join(folder, "tokenizer.model"))


def suite(size, noise, seed):
    """(SFT examples with a share `noise` of wrong answers, the same instructions answered
    right for the teacher, held-out examples). Held-out instructions never appear in
    training."""
    rng = random.Random(seed)
    seen = set()
    suites = {"heldout": [], "train": []}
    for split, count in (("heldout", size["heldout"]), ("train", size["train"])):
        examples = suites[split]
        while len(examples) < count:
            task = list(TASKS)[len(examples) % len(TASKS)]
            letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 5))
            digits = rng.sample("0123456789", rng.randint(3, 5))
            instruction, right, wrong = TASKS[task](letters, digits)
            if instruction in seen:
                continue
            seen.add(instruction)
            examples.append({"instruction": instruction, "input": "", "output": right,
                             "wrong": wrong, "task": task})
    student = []
    for example in suites["train"]:
        answer = example["wrong"] if rng.random() < noise else example["output"]
        student.append(dict(example, output=answer))
    return student, suites["train"], suites["heldout"]


def train_tokenizer(examples, path):
    """A LLaMA-style sentencepiece BPE tokenizer (byte fallback, split digits) trained on the
    suite."""
    import sentencepiece as spm
    text = [data.alpaca_prompt(e["instruction"]) + e["output"] for e in examples]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=path[: -len(".model")],
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2)


# ---- 3. the teacher and the judge

def start_teacher_server(checkpoint):
    """`python server.py` on a free port of 127.0.0.1, as a user starts it ->
    (process, base URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "server.py"),
               "--checkpoint", checkpoint,
               "--port", str(port),
               "--model-name", "demo-teacher",
               "--seed", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            if requests.get(url + "/models", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise DemoError(f"server.py did not answer at {url}")


def rule_judge_reply(messages, solutions):
    """The demo's stand-in for GPT-4 in contextual ranking: a RULE-BASED JUDGE that checks
    each candidate against the known answer (a tiny model cannot judge), and answers in
    the teacher's format (teacher.py's ranking prompt: the five steps, "rank: [...]") so
    the real prompt, parser and validation are exercised."""
    user = messages[-1]["content"]
    found = re.search(r"### Instruction:\n(.*?)\n\n### Response:", user, re.DOTALL)
    instruction = found.group(1).strip() if found else None
    if instruction not in solutions:
        unknown = "the rule-based judge knows no solution for this prompt's instruction"
        raise BadRequest(unknown, "messages")
    # a candidate runs up to the next one's heading, or to the steps after the last
    candidate_end = r"(?=\n\n###Response \d+:|\n\nFollow these steps:)"
    candidates = re.findall(r"###Response \d+:\n(.*?)" + candidate_end, user, re.DOTALL)
    solution = solutions[instruction]
    # the known answer joins as the last response, the one the teacher writes in step 2
    pool = [c.strip() for c in candidates] + [solution]
    # step 3: one of each duplicate
    kept = [i for i, c in enumerate(pool) if c not in pool[:i]]
    score = {i: judge_score(pool[i], solution) for i in kept}
    # best first; on a tie the known answer, then the lower number
    ranks = sorted(kept, key=lambda i: (-score[i], i != len(candidates), i))
    scores = "\n".join(f"Response {i}: [{score[i]}]" for i in kept)
    ranking = ", ".join(map(str, ranks))
    steps = ["(1) The instruction is close-ended.",
             f"(2) ###Response {len(candidates)}:\n{solution}",
             f"(3) Kept one of each duplicate: responses {kept}.",
             f"(4) {scores}",
             f"(5) rank: [{ranking}]"]
    return "\n".join(steps)


def judge_score(answer, solution):
    """Step 4: the known answer scores 15, any other 10 x its ROUGE-L against it (at most
    10)."""
    if answer == solution:
        return 15
    return round(10 * evaluation.rouge_l(answer, solution))


class RuleJudge:
    """The rule-based judge behind server.py's OpenAI-compatible routes: chat completions
    only."""
    name = JUDGE

    def __init__(self, solutions):
        self.solutions = solutions

    def chat(self, body):
        prompt = body["messages"][-1]["content"]
        # the client's pre-flight check (teacher.py runs it); any other prompt is a ranking request
        if prompt == PREFLIGHT_TEXT:
            return self._answer("OK")
        return self._answer(rule_judge_reply(body["messages"], self.solutions))

    def _answer(self, reply):
        message = {"role": "assistant", "content": reply}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return {"object": "chat.completion", "model": self.name, "choices": [choice],
                "usage": usage}

    def completions(self, body):
        raise BadRequest("the rule-based judge answers /v1/chat/completions only")


def start_rule_judge(solutions):
    """The rule-based judge served on 127.0.0.1 (a thread), with the same HTTP layer as
    `python server.py`."""
    server = backend_server(RuleJudge(solutions))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---- 4. results: table and picture

def evaluate_heldout(out, heldout):
    """Greedy answers of every model to the held-out instructions (eval.py's batched path:
    kept in generations/, so a rerun generates nothing), exact match and ROUGE-L as
    Super-NI scores them."""
    items = [{"id": str(i), "prompt": data.alpaca_prompt(e["instruction"])}
             for i, e in enumerate(heldout)]
    results = {}
    for name, folder in MODELS.items():
        checkpoint = os.path.join(out, folder)
        answers = greedy_answers(checkpoint, items, out)
        results[name] = heldout_scores(checkpoint, answers, heldout)
    return results


def greedy_answers(checkpoint, items, out):
    """The checkpoint's answers to `items`, in their order (kept in out/generations/)."""
    loader = evaluation.model_loader(checkpoint, None, "cpu", torch.float32)
    producer = evaluation.answer_producer(checkpoint)
    name = os.path.basename(checkpoint)
    answers = evaluation.generate_answers(name, "demo", items, loader, out, batch_size=64,
                                          max_new_tokens=16, producer=producer)
    return [answers[item["id"]] for item in items]


def heldout_scores(checkpoint, answers, heldout):
    """A model's results.json entry: exact match and ROUGE-L (x100), exact match per task,
    and every answer beside its reference."""
    references = [e["output"] for e in heldout]
    exact = [evaluation.exact_match(a, r) for a, r in zip(answers, references)]
    rouge = [evaluation.rouge_l(a, r) for a, r in zip(answers, references)]
    by_task = {}
    for task in TASKS:
        task_exact = [x for x, e in zip(exact, heldout) if e["task"] == task]
        by_task[task] = 100 * sum(task_exact) / len(task_exact)
    answer_records = [{"instruction": e["instruction"], "reference": e["output"], "answer": a}
                      for a, e in zip(answers, heldout)]
    return {"checkpoint": checkpoint,
            "items": len(heldout),
            "exact_match": 100 * sum(exact) / len(exact),
            "rouge_l": 100 * sum(rouge) / len(rouge),
            "exact_match_by_task": by_task,
            "answers": answer_records}


def results_table(results, noise, wall_time):
    """results.md: a row per model, then what the figures mean and how they were made."""
    header = "| model | exact match | ROUGE-L | " + " | ".join(TASKS) + " | items |"
    rule = "|---|---|---|" + "---|" * len(TASKS) + "---|"
    lines = [header, rule]
    for name, r in results.items():
        per_task = " | ".join(f"{r['exact_match_by_task'][t]:.0f}" for t in TASKS)
        lines.append(f"| {name} | {r['exact_match']:.1f} | {r['rouge_l']:.1f} | "
                     f"{per_task} | {r['items']} |")
    caption = ("Held-out instructions, greedy answers; "
               "exact match and ROUGE-L as Super-NI scores them (x100), "
               "then exact match per task. "
               f"SFT data: {noise:.0%} wrong answers. "
               "Contextual ranking was judged by a rule-based judge that checks the known answers "
               "(a stand-in for GPT-4). "
               f"Wall time {wall_time:.0f} s.")
    picture = "![Each stage's training curves and the held-out scores](results.svg)"
    lines += ["", caption, "", picture]
    return "\n".join(lines) + "\n"


def read_metrics(path):
    return [record for _, record in data.read_jsonl_log(path)]


# the curves of every panel: metrics.jsonl key -> (legend label, colour)
SERIES = {
    "loss": ("loss", "#222222"),
    "mle": ("MLE term", "#1f77b4"),
    "rank": ("ranking term", "#d62728"),
}
# the picture's layout, in pixels
WIDTH = 960
PANEL_W = 440
PANEL_H = 190
MARGIN_L = 56
MARGIN_B = 28


def results_svg(curves, results, subtitle):
    """A self-contained SVG (no plotting package): a panel per stage with its loss, MLE
    term and ranking term at every step (metrics.jsonl), each panel on its own axes, then
    the held-out scores per model."""
    score_top = 90 + 2 * (PANEL_H + 50)
    height = score_top + 40 + 30 * len(results)
    canvas = f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}"'
    title = "Tuna demo: each stage's training curves and the held-out scores"
    note = (f"{subtitle}; per step, loss = MLE term + ranking term (tuna.py); "
            "axes differ between panels")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" {canvas} '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
             text(20, 28, title, size=17, weight="bold"),
             text(20, 48, note)]
    for i, (label, color) in enumerate(SERIES.values()):
        x = 20 + 150 * i
        line = (f'<line x1="{x}" y1="66" x2="{x + 24}" y2="66" '
                f'stroke="{color}" stroke-width="2"/>')
        parts += [line, text(x + 30, 70, label)]
    # two panels a row
    for i, (stage, metrics) in enumerate(curves.items()):
        left = 20 + (i % 2) * (PANEL_W + 40)
        top = 90 + (i // 2) * (PANEL_H + 50)
        parts.append(stage_panel(stage, metrics, left, top))
    parts.append(score_bars(results, score_top))
    return "\n".join(parts + ["</svg>"]) + "\n"


def text(x, y, content, size=12, weight="normal", anchor="start", color="#222222"):
    """An SVG text element; `content` is escaped."""
    position = f'x="{x:.1f}" y="{y:.1f}"'
    style = f'font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" fill="{color}"'
    return f"<text {position} {style}>{html.escape(str(content))}</text>"


def x_position(step, steps, x0, x1):
    """Where a step lies between the panel's left (first step) and right (last step) edges."""
    return x0 + (x1 - x0) * (step - steps[0]) / max(steps[-1] - steps[0], 1)


def y_position(value, high, y0, y1):
    """Where a value lies between y0 (the value 0) and y1 (the value `high`)."""
    return y0 - (y0 - y1) * value / high


def stage_panel(stage, metrics, left, top):
    """One stage: its curves on axes from step 1 to its last step and from 0 to its largest
    value."""
    steps = [m["step"] for m in metrics] or [1]
    values = [m[key] for m in metrics for key in SERIES]
    high = max(values + [1e-9]) * 1.05
    x0 = left + MARGIN_L
    x1 = left + PANEL_W
    y0 = top + PANEL_H - MARGIN_B  # y0: the value 0; y1: the value `high`
    y1 = top + 24
    heading = f"{stage}: {STAGE_NOTES[stage]}"
    frame = (f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" '
             'fill="none" stroke="#bbbbbb"/>')
    parts = [f'<g class="stage" data-stage="{html.escape(stage)}" data-steps="{len(metrics)}">',
             text(left, top + 12, heading, size=13, weight="bold"),
             frame,
             text(x0 - 6, y0 + 4, "0", anchor="end"),
             text(x0 - 6, y1 + 4, f"{high:.3g}", anchor="end"),
             text(x0, y0 + 16, f"step {steps[0]}"),
             text(x1, y0 + 16, f"step {steps[-1]}", anchor="end")]
    for key, (label, color) in SERIES.items():
        xs = [x_position(m["step"], steps, x0, x1) for m in metrics]
        ys = [y_position(m[key], high, y0, y1) for m in metrics]
        points = " ".join(f"{x:.2f},{y:.2f}" for x, y in zip(xs, ys))
        parts.append(f'<polyline class="{key}" points="{points}" fill="none" stroke="{color}" '
                     f'stroke-width="1.3"><title>{label}</title></polyline>')
    return "\n".join(parts + ["</g>"])


def score_bars(results, top):
    """Held-out exact match (dark) and ROUGE-L (light) per model, on one 0-100 scale."""
    x0 = 200  # 100 points = 640 pixels
    scale = 6.4
    title = "Held-out instructions, greedy answers: exact match (dark) and ROUGE-L (light), x100"
    parts = ['<g class="scores">', text(20, top + 14, title, size=13, weight="bold")]
    for i, (name, r) in enumerate(results.items()):
        y = top + 30 + 30 * i
        model_name = html.escape(name)
        label_x = x0 + scale * max(r["rouge_l"], r["exact_match"]) + 8
        parts += [text(x0 - 10, y + 14, name, anchor="end"),
                  f'<rect class="rouge_l" data-model="{model_name}" x="{x0}" y="{y}" '
                  f'width="{scale * r["rouge_l"]:.1f}" height="20" fill="#c6dbef"/>',
                  f'<rect class="exact_match" data-model="{model_name}" x="{x0}" y="{y + 4}" '
                  f'width="{scale * r["exact_match"]:.1f}" height="12" fill="#08519c"/>',
                  text(label_x, y + 14, f"{r['exact_match']:.1f} / {r['rouge_l']:.1f}")]
    return "\n".join(parts + ["</g>"])


if __name__ == "__main__":
    sys.exit(main())
