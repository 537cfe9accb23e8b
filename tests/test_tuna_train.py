"""tuna.py end to end on a tiny model: the CLI stages, checkpoints, --resume after SIGKILL, NaN stop, torchrun."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import model
import tokenizer
import training
import tuna
from client import PREFLIGHT_TEXT
from conftest import RecordOps, sequence_logprobs
from test_data import HOLD_LOCK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNA = os.path.join(ROOT, "tuna.py")
WORDS = "the quick brown fox jumps over lazy dog cat sleeps in sun capital of France is Paris tips".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory, spm_model_path):
    """A tiny random LLaMA checkpoint (vocab 512, like the test tokenizer) and small data files."""
    root = tmp_path_factory.mktemp("tuna_train")
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs.from_name("tiny"))
    checkpoint.save_hf_checkpoint(net, str(root / "init"))
    shutil.copyfile(spm_model_path, root / "init" / "tokenizer.model")
    rng = random.Random(0)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    records, alpaca, authors = [], [], []
    for i in range(16):
        instruction, candidates = say(3, 8), [say(2, 12) for _ in range(rng.choice([2, 3, 4]))]
        records.append(data.RankedRecord(id=f"r{i}", prompt=data.alpaca_prompt(instruction), candidates=candidates,
                                         instruction=instruction, source={"kind": "probabilistic"}))
        alpaca.append({"instruction": instruction, "input": "", "output": candidates[0]})
        authors.append({"instruction": data.alpaca_prompt(instruction), "id": i, "output": candidates,
                        "score": [-float(k) for k in range(len(candidates))]})
    data.write_ranked_jsonl(root / "ranked.jsonl", records)
    (root / "alpaca.json").write_text(json.dumps(alpaca))
    (root / "authors.json").write_text(json.dumps(authors))
    return root


def run(*argv):
    return tuna.main([str(a) for a in argv])


def common(files, out, *extra):
    return ["--init", files / "init", "--out", out, "--batch-size", 4, *extra]


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(folder):
    return checkpoint.read_safetensors(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-5, msg=key)


def test_rank_writes_a_loadable_checkpoint_metrics_and_progress(files, tmp_path, capsys):
    out = tmp_path / "tuna_p"
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, out)) == 0
    assert not os.path.exists(out / "checkpoints")  # step checkpoints go when the run is finished
    loaded = checkpoint.load_checkpoint(str(out))
    assert loaded.args.vocab_size == 512
    assert (out / "tokenizer.model").read_bytes() == (files / "init" / "tokenizer.model").read_bytes()
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "mle", "rank", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert json.load(open(out / "run.json"))["data"] == str(files / "ranked.jsonl")
    assert all(m["loss"] == pytest.approx(m["mle"] + m["rank"]) and m["rank"] >= 0 for m in lines)
    assert lines[1]["lr"] == pytest.approx(1e-5)  # the authors' train_tuna.sh: Tuna_p lr 1e-5, 2 warm-up steps
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["finished"]
    assert any(not torch.equal(weights(out)[k], weights(files / "init")[k]) for k in weights(out))
    err = capsys.readouterr().err
    assert "step 4/4 | loss" in err and "tok/s" in err and "ETA" in err


def test_log_reports_mfu_and_gradient_checkpointing_auto_is_off_where_memory_suffices(files, tmp_path, capsys):
    """Each step's FLOPs (training.step_flops, tested by hand in test_tuna.py) and, with --peak-tflops, the MFU: the
    FLOPs so far over the elapsed time at that peak. auto: a tiny model's activations fit this machine's free
    memory (/proc/meminfo's MemAvailable), so no recomputation; the bare flag still means on."""
    hfu = {}
    for flag in (["--gradient-checkpointing", "auto"], ["--gradient-checkpointing"]):
        out = tmp_path / flag[-1].strip("-")
        assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 2, "--peak-tflops",
                                                                    0.5, *flag)) == 0
        lines, err = metrics(out), capsys.readouterr().err
        flops = sum(m["model_flops_per_token"] * m["tokens"] for m in lines)
        assert lines[-1]["mfu"] == pytest.approx(flops / (lines[-1]["elapsed_s"] * 0.5e12))
        assert re.search(r"step 2/2 \| .* tok/s x [\d.]+ GFLOP/token, MFU [\d.]+% \(with recomputation", err)
        # tiny: 6 x 98_304 per token in its blocks' full fine-tuning, at least
        assert all(m["model_flops_per_token"] > 6 * 98_304 for m in lines)
        hfu[flag[-1]] = lines[-1]["hardware_flops_per_token"] / lines[-1]["model_flops_per_token"]
        if flag[-1] == "auto":
            assert "gradient checkpointing off (auto)" in err and "GiB free on cpu" in err
    assert hfu["--gradient-checkpointing"] > hfu["auto"] == 1  # recomputed blocks (logits: one chunk a step)


def test_training_lowers_the_loss_on_data_it_sees_again(files, tmp_path):
    out = tmp_path / "overfit"
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--lr", 3e-3, "--epochs", 6)) == 0
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_sft_authors_json_and_the_two_stage_pipeline(files, tmp_path):
    sft = tmp_path / "alpaca"
    assert run("sft", "--data", files / "alpaca.json", *common(files, sft, "--max-steps", 2)) == 0
    assert all(m["rank"] == 0 for m in metrics(sft))  # one candidate: the loss is the cross-entropy alone
    authors = tmp_path / "authors"
    assert run("rank", "--data", files / "authors.json", "--init", sft, "--out", authors, "--batch-size", 8) == 0
    assert len(metrics(authors)) == 2
    tuna_dir = tmp_path / "tuna"
    assert run("pipeline", "--probabilistic-data", files / "ranked.jsonl", "--contextual-data", files / "authors.json",
               "--init", sft, "--out", tuna_dir, "--batch-size", 8) == 0
    assert max(m["lr"] for m in metrics(tuna_dir / "tuna_p")) == pytest.approx(1e-5)
    assert max(m["lr"] for m in metrics(tuna_dir / "tuna")) == pytest.approx(1e-6)
    assert json.load(open(tuna_dir / "tuna" / "run.json"))["init"] == str(tuna_dir / "tuna_p")
    checkpoint.load_checkpoint(str(tuna_dir / "tuna"))


def first_step_mle_by_hand(files, best_only):
    """L_MLE of a step over all 16 records, from the init model with each (prompt, candidate) alone in its own
    row: -(sum of the used response tokens' log-probs) / their count; best_only: candidate 0's tokens only."""
    tok, net = tokenizer.Tokenizer(str(files / "init")), checkpoint.load_checkpoint(str(files / "init"))
    records = data.read_ranked_jsonl(files / "ranked.jsonl")
    pairs = [data.encode_prompt_response(tok, r.prompt, c, tuna.MAX_LEN)
             for r in records for c in r.candidates[:1 if best_only else None]]
    with torch.no_grad():
        sums, counts = sequence_logprobs(net, [p for p, _ in pairs], [r for _, r in pairs])
    return -sums.sum().item() / counts.sum().item()


def test_mle_best_only_puts_the_mle_term_on_the_best_candidate_alone(files, tmp_path):
    runs = {}
    for best_only in (False, True):
        out = tmp_path / f"best_only_{best_only}"
        flag = ["--mle-best-only"] if best_only else []
        one_step_of_all = common(files, out, "--batch-size", 16, "--max-steps", 1, *flag)
        assert run("rank", "--data", files / "ranked.jsonl", *one_step_of_all) == 0
        runs[best_only] = metrics(out)[0]
        assert runs[best_only]["mle"] == pytest.approx(first_step_mle_by_hand(files, best_only), rel=1e-5)
    assert runs[True]["mle"] != pytest.approx(runs[False]["mle"], rel=1e-3)  # the two readings differ here
    assert runs[True]["rank"] == pytest.approx(runs[False]["rank"], rel=1e-6)  # the ranking term stays
    assert runs[True]["loss"] == pytest.approx(runs[True]["mle"] + runs[True]["rank"], rel=1e-6)


def test_a_partial_last_batch_is_a_step_of_its_own(files, tmp_path):
    """16 records, batches of 5: steps of 5, 5, 5 and 1 record in each epoch, so every record is trained
    once per epoch (4 steps, not 3). Split into micro-batches of 2 (3 per step), a last batch of 1 record
    cannot give each micro-batch one: it is left out (3 steps)."""
    tok = tokenizer.Tokenizer(str(files / "init"))
    tokens_per_epoch = sum(len(row["tokens"]) for row in tuna.load_rows(files / "ranked.jsonl", tok, "rank"))
    for extra, steps_per_epoch in (([], 4), (["--micro-batch-size", 2], 3)):
        out = tmp_path / f"partial{len(extra)}"
        two_epochs = common(files, out, "--batch-size", 5, "--epochs", 2, *extra)
        assert run("rank", "--data", files / "ranked.jsonl", *two_epochs) == 0
        lines = metrics(out)
        assert [m["step"] for m in lines] == list(range(1, 2 * steps_per_epoch + 1))
        assert [m["epoch"] for m in lines] == [0] * steps_per_epoch + [1] * steps_per_epoch
        for epoch in range(2):
            trained = sum(m["tokens"] for m in lines if m["epoch"] == epoch)
            assert trained == tokens_per_epoch if steps_per_epoch == 4 else trained < tokens_per_epoch


def test_an_existing_run_is_never_replaced_silently(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 1)]
    assert run(*args) == 0
    before = weights(out)
    assert run(*args) == 1
    assert "already exists" in capsys.readouterr().err
    assert run(*args, "--resume") == 0  # same settings, finished: nothing to do
    assert "already finished" in capsys.readouterr().err
    assert run(*args, "--resume", "--lr", "1e-3") == 1  # a different run
    assert "lr" in capsys.readouterr().err
    assert all(torch.equal(before[k], weights(out)[k]) for k in before)
    assert run(*args, "--overwrite", "--lr", "1e-3") == 0
    assert metrics(out)[0]["lr"] == pytest.approx(0.5e-3)


# each run.json key -> (command, flags, a method constant set otherwise) that change it alone
RUN_JSON_CHANGES = {
    "kind": ("sft", [], None), "init": ("rank", ["--init", "init copy"], None),
    "init_identity": ("rank", [], None), "tokenizer_sha256": ("rank", [], None),  # base retrained / tokenizer replaced
    "data": ("rank", ["--data", "copy.jsonl"], None), "data_sha256": ("rank", [], None),  # data.jsonl edited
    "lr": ("rank", ["--lr", 2e-5], None), "epochs": ("rank", ["--epochs", 2], None),
    "max_steps": ("rank", ["--max-steps", 2], None), "batch_size": ("rank", ["--batch-size", 8], None),
    "seed": ("rank", ["--seed", 7], None), "precision": ("rank", ["--precision", "fp32"], None),
    "lora_rank": ("rank", ["--lora-rank", 4], None), "lora_alpha": ("rank", ["--lora-alpha", 8], None),
    "lora_targets": ("rank", ["--lora-targets", "wq"], None),
    "mle_best_only": ("rank", ["--mle-best-only"], None),
    "margin": ("rank", [], ("MARGIN", 0.2)), "mle_weight": ("rank", [], ("MLE_WEIGHT", 0.5)),
    "length_penalty": ("rank", [], ("LENGTH_PENALTY", 0.5)), "max_len": ("rank", [], ("MAX_LEN", 256)),
    "grad_clip": ("rank", [], ("GRAD_CLIP", 0.5)),
}


def test_resume_refuses_a_change_of_any_setting_in_run_json(files, tmp_path, capsys, monkeypatch):
    """--resume continues only the run that run.json describes: a change of any one of its keys (another
    --seed would mix two data orders) is refused, naming that key, and the run is left as it was."""
    shutil.copytree(files / "init", tmp_path / "init copy")
    shutil.copytree(files / "init", tmp_path / "base")
    for name in ("copy.jsonl", "data.jsonl"):
        shutil.copyfile(files / "ranked.jsonl", tmp_path / name)
    out = tmp_path / "run"
    same = ["--data", tmp_path / "data.jsonl", "--init", tmp_path / "base", "--out", out, "--lr", 1e-5,
            "--epochs", 1, "--batch-size", 4, "--max-steps", 1, "--seed", 42]
    assert run("rank", *same) == 0
    settings, before = json.load(open(out / "run.json")), weights(out)
    assert set(settings) == set(RUN_JSON_CHANGES)  # a new key in run.json needs its line here
    capsys.readouterr()
    for key, (command, flags, constant) in RUN_JSON_CHANGES.items():
        with monkeypatch.context() as patch:
            if constant:
                patch.setattr(tuna, *constant)
            flags = [tmp_path / f if f in ("init copy", "copy.jsonl") else f for f in flags]
            ranked = (tmp_path / "data.jsonl").read_text()
            if key == "data_sha256":  # the same path, one record less
                (tmp_path / "data.jsonl").write_text(ranked[:ranked.rindex("\n", 0, -1) + 1])
            if key == "init_identity":  # the same path, other weights
                retrain_in_place(tmp_path / "base")
            if key == "tokenizer_sha256":  # the same path, another tokenizer
                shutil.copyfile(other_tokenizer(tmp_path), tmp_path / "base" / "tokenizer.model")
            assert run(command, *same, *flags, "--resume") == 1, key
            (tmp_path / "data.jsonl").write_text(ranked)
            shutil.rmtree(tmp_path / "base")
            shutil.copytree(files / "init", tmp_path / "base")  # its files and their times, as before
        assert f"this run was started with other settings ({key});" in capsys.readouterr().err
    assert run("rank", *same, "--resume") == 0 and "already finished" in capsys.readouterr().err
    assert json.load(open(out / "run.json")) == settings and len(metrics(out)) == 1
    assert all(torch.equal(before[k], weights(out)[k]) for k in before)


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(files, tmp_path, capsys):
    out = tmp_path / "run"
    lines = (files / "ranked.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    assert run("rank", "--data", tmp_path / "cut.jsonl", *common(files, out)) == 1
    assert "cut.jsonl, line 2: malformed JSON" in capsys.readouterr().err and not os.path.exists(out)
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 1)) == 0  # no --overwrite
    before = weights(out)
    # --overwrite replaces a run only when the new one takes its first step: bad data keeps the old run whole
    assert run("rank", "--data", tmp_path / "cut.jsonl", *common(files, out, "--overwrite")) == 1
    assert all(torch.equal(before[k], weights(out)[k]) for k in before) and len(metrics(out)) == 1


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "nan"
    # lr 1e30: the first update pushes every weight to ~1e30, so the second forward overflows to inf/nan
    code = run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--lr", 1e30, "--save-every", 1))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite loss" in err and "at step 2 " in err and "records [" in err
    assert not os.path.exists(out / "config.json")  # not a finished checkpoint
    assert os.listdir(out / "checkpoints") == ["step-00000001"]
    checkpoint.load_checkpoint(str(out / "checkpoints" / "step-00000001"))


def test_gradient_accumulation_equals_one_big_batch(files, tmp_path):
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    args = ["rank", "--data", files / "ranked.jsonl", "--lr", 1e-3]
    assert run(*args, *common(files, whole)) == 0
    assert run(*args, *common(files, accumulated, "--micro-batch-size", 1)) == 0
    for a, b in zip(metrics(whole), metrics(accumulated)):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
    assert_same_weights(whole, accumulated, atol=1e-5)


def test_lora_run_saves_merged_weights_and_leaves_the_rest(files, tmp_path):
    out = tmp_path / "lora"
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--lora-rank", 4, "--lr", 1e-2,
                                                                   "--lora-targets", "wq,wv")) == 0
    before, after = weights(files / "init"), weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}


def test_cuda_paths_chosen_on_a_cpu_fused_adam_and_bf16_autocast(files, tmp_path, capsys):
    """What a GPU run does by default, run on the CPU by flag and compared with the CPU's default (foreach
    AdamW, float32): the fused AdamW kernel gives the same losses and weights; bfloat16 autocast the same
    losses within bfloat16's precision (8 bits of mantissa), and not the float32 ones."""
    args = ["rank", "--data", files / "ranked.jsonl", "--lr", 1e-3, "--device", "cpu"]
    runs = {}
    for name, flags in (("default", []), ("fused", ["--fused-adam"]), ("autocast", ["--autocast"])):
        with RecordOps() as recorded:
            assert run(*args, *common(files, tmp_path / name, *flags)) == 0
        runs[name] = metrics(tmp_path / name), recorded.ops
    (default, default_ops), (fused, fused_ops), (autocast, _) = runs.values()
    assert "_fused_adamw_" in fused_ops and "_fused_adamw_" not in default_ops  # the kernel asked for ran
    for a, b in zip(default, fused):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-6)
    assert_same_weights(tmp_path / "default", tmp_path / "fused", atol=1e-6)
    for a, b in zip(default, autocast):  # bfloat16 keeps 8 bits: a relative step of 2 ** -8 = 0.004
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=4e-3)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(default, autocast)) > 1e-5
    assert run(*args, *common(files, tmp_path / "fp32", "--precision", "fp32", "--autocast")) == 1
    assert "--autocast needs --precision bf16-mixed (not fp32)" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(files, tmp_path, capsys):
    args = ["rank", "--data", files / "ranked.jsonl", "--lr", 1e-3, "--epochs", 4, "--save-every", 2]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(*args, *common(files, straight, "--batch-size", 2)) == 0  # the later --batch-size wins
    cmd = [sys.executable, TUNA, *map(str, args), *map(str, common(files, killed, "--batch-size", 2))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 5/"):  # a checkpoint at step 4 exists; kill between checkpoints
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(killed / "config.json") and os.path.isdir(killed / "checkpoints")  # unfinished
    capsys.readouterr()
    assert run(*args, *common(files, killed, "--batch-size", 2, "--resume")) == 0
    resumed_from = int(re.search(r"from step (\d+)", capsys.readouterr().err).group(1))
    assert 4 <= resumed_from < 32 and resumed_from % 2 == 0  # from a checkpoint, not from scratch
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 33))
    for x, y in zip(a, b):
        assert (x["loss"], x["lr"]) == pytest.approx((y["loss"], y["lr"]), rel=1e-6)
    assert_same_weights(straight, killed, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(files, tmp_path, engine):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["rank", "--data", files / "ranked.jsonl", "--lr", 1e-3]
    assert run(*args, *common(files, one)) == 0
    extra = ["--fsdp", "--micro-batch-size", "1"] if engine == "fsdp" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TUNA,
           *map(str, args), *map(str, common(files, two)), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    for a, b in zip(metrics(one), metrics(two)):  # grad_norm too: Adam alone would hide a wrong gradient scale
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
    assert_same_weights(one, two, atol=1e-5)


@pytest.mark.slow
def test_pipeline_builds_contextual_data_from_tuna_p_with_teacher_py(files, tmp_path, capfd):
    """No --contextual-data: Tuna_p samples candidates and a (stub) ranking teacher orders them via teacher.py."""
    import http.server
    import threading

    reply = "(1) close-ended\n(2) ###Response 2: Paris is the capital.\n(3) no duplicates\n(5) rank: [2, 0, 1]"
    requests_seen, preflights = [], []  # the pre-flight checks apart: the run's requests are counted below

    class StubTeacher(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            is_preflight = body["messages"][-1]["content"] == PREFLIGHT_TEXT
            (preflights if is_preflight else requests_seen).append(body)
            answer = json.dumps({"object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                              "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "tuna"
    pipeline = lambda *extra: run(  # noqa: E731
        "pipeline", "--probabilistic-data", files / "ranked.jsonl", "--init", files / "init", "--out", out,
        "--batch-size", 4, "--instructions", files / "alpaca.json",
        "--teacher-base-url", f"http://127.0.0.1:{server.server_port}/v1", "--teacher-model", "stub-gpt-4",
        "--teacher-args", "--limit 4 --n 2 --tries 1 --student-max-tokens 6 --workers 1", *extra)
    student_cache = out / "contextual.jsonl.student.jsonl"
    try:
        assert pipeline() == 0
        assert len(requests_seen) == 4 and requests_seen[0]["model"] == "stub-gpt-4"
        assert len(preflights) == 2  # the pipeline's, before Tuna_p, and teacher.py contextual's own
        # --student-batch-size auto (the default) reaches teacher.py, which samples 64 rows together on a CPU
        err = capfd.readouterr().err
        command = next(line for line in err.splitlines() if line.startswith("pipeline: "))
        assert "--student-batch-size auto" in command and "student: 64 rows sample together" in err
        records = data.read_ranked_jsonl(out / "contextual.jsonl")
        assert len(records) == 4 and all(r.candidates[0] == "Paris is the capital." for r in records)
        assert records[0].source["student_candidates"]  # sampled from Tuna_p
        assert records[0].source["student"]["checkpoint"] == checkpoint.checkpoint_identity(str(out / "tuna_p"))
        assert json.load(open(out / "tuna" / "run.json"))["data"] == str(out / "contextual.jsonl")
        assert len(metrics(out / "tuna")) == 1
        # the same run again: the contextual data is rebuilt from the caches, nothing sampled or paid again
        assert pipeline("--resume") == 0 and len(requests_seen) == 4 and len(read_lines(student_cache)) == 4
        # Tuna_p retrained (another learning rate), then --overwrite: new samples from the new Tuna_p, never the
        # old Tuna_p's
        old_identity = records[0].source["student"]["checkpoint"]
        assert pipeline("--overwrite", "--lr-probabilistic", 1e-3) == 0
    finally:
        server.shutdown()
    new_identity = checkpoint.checkpoint_identity(str(out / "tuna_p"))
    entries = read_lines(student_cache)
    assert new_identity != old_identity and len(entries) == 8
    assert [e["settings"]["student"]["checkpoint"] for e in entries] == [old_identity] * 4 + [new_identity] * 4
    retrained = data.read_ranked_jsonl(out / "contextual.jsonl")
    assert all(r.source["student"]["checkpoint"] == new_identity for r in retrained)
    # the cache holds items in the order they finished (shortest prompts first), the records in data order
    old, new = ({e["id"]: e["candidates"] for e in part} for part in (entries[:4], entries[4:]))
    assert {r.id: r.source["student_candidates"] for r in retrained} == new
    assert len(requests_seen) == 4 + sum(new[i] != old[i] for i in new)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_second_run_on_the_same_output_refuses_at_once(files, tmp_path, capsys):
    """One writer per run folder: the other process is named; a lock left by a killed run blocks nothing."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 1)) == 1
        assert f"{out} is being written by another process (pid {holder.pid}" in capsys.readouterr().err
        assert not os.path.exists(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 1)) == 0


def test_the_authors_release_with_one_bad_record_trains_on_the_rest(files, tmp_path, capsys):
    release = json.load(open(files / "authors.json"))
    release[3]["score"][0] = float("nan")
    (tmp_path / "release.json").write_text(json.dumps(release))
    assert run("rank", "--data", tmp_path / "release.json", *common(files, tmp_path / "out", "--max-steps", 1)) == 0
    err = capsys.readouterr().err
    assert "1 record(s) skipped, e.g. " in err and "record 3, field 'score[0]'" in err and "15 examples" in err


# ---- what a user names is never destroyed, and no input costs more than it should

def test_overwrite_replaces_only_a_run_folder_or_an_empty_folder(files, tmp_path, capsys):
    """--overwrite replaces a folder that holds a run.json of tuna.py, or nothing; any other folder or a file is
    refused by name and left as it was."""
    project = tmp_path / "some_project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine too")
    for out in (project, tmp_path / "a_file"):
        assert run("rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 1, "--overwrite")) == 1
        err = capsys.readouterr().err
        assert f"--overwrite: {out} is not a run folder of tuna.py" in err, err
    assert os.listdir(project) == ["notes.txt"] and (project / "notes.txt").read_text() == "mine"
    assert (tmp_path / "a_file").read_text() == "mine too"
    (tmp_path / "empty").mkdir()
    assert run("rank", "--data", files / "ranked.jsonl", *common(files, tmp_path / "empty", "--max-steps", 1,
                                                                    "--overwrite")) == 0


def test_an_output_over_an_input_is_refused_before_anything_is_written(files, tmp_path, capsys):
    """`sft --init ck --out ck --overwrite` once trained a step, then found ck gone. An --out that is, holds or lies
    inside an input (--init, --data, --tokenizer; the pipeline's data and instructions) is refused, naming
    both, before anything is written (not even OUT.lock)."""
    ck = tmp_path / "ck"
    shutil.copytree(files / "init", ck)
    os.symlink(ck, tmp_path / "link")
    (tmp_path / "inputs").mkdir()
    for name in ("ranked.jsonl", "alpaca.json"):
        shutil.copyfile(files / name, tmp_path / "inputs" / name)
    ranked, alpaca = tmp_path / "inputs" / "ranked.jsonl", tmp_path / "inputs" / "alpaca.json"
    before, listing = weights(ck), sorted(os.listdir(ck))
    pipeline = ["pipeline", "--init", files / "init", "--probabilistic-data", ranked]
    cases = [  # (arguments, the refusal)
        (["sft", "--init", ck, "--data", alpaca, "--out", ck, "--overwrite"], f"{ck} is --init {ck}"),
        (["rank", "--init", ck, "--data", ranked, "--out", tmp_path / "link", "--overwrite"],
         f"{tmp_path / 'link'} is --init {ck}"),
        (["rank", "--init", ck, "--data", ranked, "--out", ck / "run"], f"{ck / 'run'} is inside --init {ck}"),
        (["rank", "--init", files / "init", "--data", ranked, "--out", tmp_path / "inputs", "--overwrite"],
         f"{tmp_path / 'inputs'} holds --data {ranked}"),
        (["rank", "--init", files / "init", "--data", files / "ranked.jsonl", "--tokenizer", ck / "tokenizer.model",
          "--out", ck], f"{ck} holds --tokenizer {ck / 'tokenizer.model'}"),
        ([*pipeline, "--contextual-data", files / "authors.json", "--out", tmp_path / "inputs"],
         f"{tmp_path / 'inputs'} holds --probabilistic-data {ranked}"),
        ([*pipeline[:-1], files / "ranked.jsonl", "--contextual-data", ranked, "--out", tmp_path / "inputs"],
         f"{tmp_path / 'inputs'} holds --contextual-data {ranked}"),
        ([*pipeline[:-1], files / "ranked.jsonl", "--instructions", alpaca, "--teacher-base-url", "http://127.0.0.1:9",
          "--teacher-model", "m", "--out", tmp_path / "inputs"], f"{tmp_path / 'inputs'} holds --instructions {alpaca}"),
    ]
    for argv, refusal in cases:
        out = argv[argv.index("--out") + 1]
        assert run(*argv) == 1, argv
        err = capsys.readouterr().err
        assert refusal in err and "error: " in err, err
        assert not os.path.lexists(f"{out}.lock"), argv  # nothing written, not even the lock
    assert sorted(os.listdir(ck)) == listing and all(torch.equal(before[k], weights(ck)[k]) for k in before)
    assert sorted(os.listdir(tmp_path / "inputs")) == ["alpaca.json", "ranked.jsonl"]


def ranked_file_with(files, path, extra, at=8):
    """ranked.jsonl with `extra` (a RankedRecord) inserted as record `at` (line at + 1)."""
    records = data.read_ranked_jsonl(files / "ranked.jsonl")
    data.write_ranked_jsonl(path, records[:at] + [extra] + records[at:])
    return path


def test_a_record_of_more_candidates_than_tuna_trains_is_refused_by_name(files, tmp_path, capsys):
    """tuna.MAX_CANDIDATES per record (the contextual prompt names at most 17; a file of 10,000 candidates once
    became one 228,913-token row): a record over it is refused, naming the file and line (or record index), at
    reading, before anything is tokenized or written."""
    many = [f"answer {k}" for k in range(tuna.MAX_CANDIDATES + 1)]
    record = data.RankedRecord(id="many", prompt=data.alpaca_prompt("Count."), candidates=many)
    path = ranked_file_with(files, tmp_path / "many.jsonl", record)
    out = tmp_path / "run"
    assert run("rank", "--data", path, *common(files, out, "--max-steps", 1)) == 1
    err = capsys.readouterr().err
    assert (f"{path}, line 9, field 'candidates': {len(many)} candidates, more than the {tuna.MAX_CANDIDATES} a "
            "record may hold for training") in err, err
    assert not os.path.exists(out)
    release = json.load(open(files / "authors.json"))
    release[2].update(output=many, score=[-float(k) for k in range(len(many))])
    (tmp_path / "many.json").write_text(json.dumps(release))
    assert run("rank", "--data", tmp_path / "many.json", *common(files, out, "--max-steps", 1)) == 1
    assert f"{tmp_path / 'many.json'}, record 2, field 'output': {len(many)} candidates" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_record_whose_row_cannot_fit_in_memory_is_refused_by_name_before_run_json(files, tmp_path, capsys,
                                                                                    monkeypatch):
    """A packed row costs its activations and a T x T attention mask (collate, then SDPA's copy of it in the
    compute dtype): a row that cannot fit in free memory even alone and with gradient checkpointing is a
    DataError naming the file, record and token count, before run.json is written (not a 52 GB allocation and a
    traceback after it). The device's free memory is made small (the monkeypatch stands for a smaller device;
    the rows, the model and the check are real)."""
    words = " ".join(WORDS)
    record = data.RankedRecord(id="long", prompt=data.alpaca_prompt("Say everything."),
                               candidates=[f"{k}: {words}" for k in range(tuna.MAX_CANDIDATES)])
    path = ranked_file_with(files, tmp_path / "long.jsonl", record)
    tok = tokenizer.Tokenizer(str(files / "init"))
    rows = tuna.load_rows(path, tok, "rank")
    tokens = len(rows[8]["tokens"])
    assert rows[8]["id"] == "long" and tokens > 10 * max(len(r["tokens"]) for r in rows if r["id"] != "long")
    net = checkpoint.load_checkpoint(str(files / "init"))
    trainable = sum(p.numel() for p in net.parameters())
    need = training.row_bytes(net.args, tokens, multiple_candidates=True, dtype_bytes=4)
    assert need > tokens * tokens  # the mask is counted
    # free memory: enough for every other record, not for this one
    free = (trainable * 12 + need // 2) / training.TRAINING_MEMORY_SHARE
    monkeypatch.setattr(model, "free_memory", lambda device: free)
    out = tmp_path / "run"
    assert run("rank", "--data", path, *common(files, out, "--max-steps", 1)) == 1
    err = capsys.readouterr().err
    assert f"{path}, record 8 (id 'long'): its {tokens} tokens in one row need about" in err, err
    assert "attention mask" in err and "Traceback" not in err
    assert not os.path.exists(out)  # no run.json


# a tuna.py run in a subprocess, SIGKILLed when it fsyncs a file whose path matches argv[1]: a save killed midway
KILL_AT_FSYNC = """
import os, re, signal, sys
sys.path.insert(0, os.getcwd())
fsync = os.fsync
def killing_fsync(fd):
    if re.search(sys.argv[1], os.readlink(f"/proc/self/fd/{fd}")):
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
os.fsync = killing_fsync
import tuna
sys.exit(tuna.main(sys.argv[2:]))
"""


def killed_in_a_save(pattern, *argv):
    result = subprocess.run([sys.executable, "-c", KILL_AT_FSYNC, pattern, *map(str, argv)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def temporary_files(folder):
    return [os.path.join(d, n) for d, dirs, names in os.walk(folder) for n in dirs + names if ".tmp" in n]


def test_a_save_killed_midway_leaves_nothing_that_the_next_save_does_not_clear(files, tmp_path, capsys):
    """A kill inside a step checkpoint leaves checkpoints/step-N.tmp, one inside the final save a
    model.safetensors.tmpPID in OUT itself (gigabytes at 7B): the resumed run's saves clear both."""
    out = tmp_path / "run"
    argv = ["rank", "--data", files / "ranked.jsonl", *common(files, out, "--max-steps", 3, "--save-every", 1)]
    killed_in_a_save(r"/checkpoints/step-00000002\.tmp/model\.safetensors\.tmp\d+$", *argv)
    assert temporary_files(out) and os.listdir(out / "checkpoints") == ["step-00000001", "step-00000002.tmp"]
    killed_in_a_save(re.escape(str(out)) + r"/model\.safetensors\.tmp\d+$", *argv, "--resume")
    assert [os.path.basename(t)[:21] for t in temporary_files(out)] == ["model.safetensors.tmp"]
    assert not os.path.exists(out / "config.json")  # unfinished: the final save was killed
    assert run(*argv, "--resume") == 0 and "from step 2" in capsys.readouterr().err
    assert temporary_files(out) == [] and not os.path.exists(out / "checkpoints")
    checkpoint.load_checkpoint(str(out))


def retrain_in_place(folder):
    """The checkpoint in `folder` replaced by one with other weights, as a retraining would."""
    net = checkpoint.load_checkpoint(str(folder))
    with torch.no_grad():
        net.norm.weight.add_(1.0)
    checkpoint.save_hf_checkpoint(net, str(folder))


def other_tokenizer(folder):
    """A small sentencepiece tokenizer, another than the fixture's: its path."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(WORDS * 4), model_prefix=str(folder / "other"),
                                   model_type="bpe", vocab_size=60, hard_vocab_limit=False, minloglevel=2)
    return folder / "other.model"


def test_resume_refuses_another_base_model_or_tokenizer_under_the_same_paths(files, tmp_path, capsys,
                                                                             spm_model_path):
    """A LoRA run resumes from the base model at --init plus its adapters: run.json records the base's identity
    (checkpoint.checkpoint_identity) and the tokenizer files' sha256, so a base retrained in place or another
    tokenizer under the same path is refused by name; the base restored, the run resumes."""
    base = tmp_path / "base"
    shutil.copytree(files / "init", base)
    out = tmp_path / "lora"
    argv = ["rank", "--data", files / "ranked.jsonl", "--init", base, "--out", out, "--batch-size", 4,
            "--max-steps", 2, "--save-every", 1, "--lora-rank", 4]
    killed_in_a_save(re.escape(str(out)) + r"/model\.safetensors\.tmp\d+$", *argv)  # unfinished, step 1 saved
    retrain_in_place(base)
    assert run(*argv, "--resume") == 1
    assert "this run was started with other settings (init_identity);" in capsys.readouterr().err
    shutil.rmtree(base)
    shutil.copytree(files / "init", base)  # the same files again (copytree keeps their times)
    shutil.copyfile(other_tokenizer(tmp_path), base / "tokenizer.model")  # another tokenizer under the same path
    assert run(*argv, "--resume") == 1
    assert "this run was started with other settings (tokenizer_sha256);" in capsys.readouterr().err
    shutil.copyfile(spm_model_path, base / "tokenizer.model")
    settings = json.load(open(out / "run.json"))
    assert settings["init_identity"] == checkpoint.checkpoint_identity(str(base))
    assert settings["tokenizer_sha256"] == {"tokenizer.model": data.file_sha256(spm_model_path)}
    assert run(*argv, "--resume") == 0 and "from step 1" in capsys.readouterr().err
