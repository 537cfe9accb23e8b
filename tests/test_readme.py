"""README's snippets run as written: the two Python blocks of "Using pieces in your project", on a tiny
checkpoint the test writes in place of the folder the snippet names, and what they compute is checked."""
import os
import re
import shutil

import torch

import checkpoint
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippets(section):
    """The ```python blocks of README.md's `## section`, in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_the_model_snippet_loads_a_checkpoint_and_answers_greedily_and_by_sampling(tmp_path, spm_model_path):
    snippet = readme_snippets("Using pieces in your project")[0]
    assert 'folder = "llama-2-7b-hf/"' in snippet
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32,
                                            max_seq_len=256)).eval()
    folder = tmp_path / "tiny"
    checkpoint.save_hf_checkpoint(net, str(folder))
    shutil.copy(spm_model_path, folder / "tokenizer.model")
    scope = {}
    exec(snippet.replace('"llama-2-7b-hf/"', repr(str(folder) + "/")), scope)
    prompts, answers, samples = scope["prompts"], scope["answers"], scope["samples"]
    stops = scope["tok"].stop_ids
    assert len(answers) == len(prompts) == 2 and len(samples) == 4 * len(prompts)
    # each row ends at a stop id or at the 64-token limit, never after a stop id
    for row in answers + samples:
        assert 0 < len(row) <= 64 and all(t not in stops for t in row[:-1])
        assert row[-1] in stops or len(row) == 64
    # greedy is the argmax path of the same model: its first token is the argmax after the prompt
    first_logits = net(torch.tensor([prompts[0]]))[0, -1]
    assert answers[0][0] == int(first_logits.argmax())
    # one generator per row: a row drawn again alone with its own seed gives the same tokens
    again, _ = model.generate(net, [prompts[1]], 64, temperature=0.8, top_p=0.9, num_samples=1,
                              generator=[torch.Generator("cpu").manual_seed(5)], eos_id=stops)
    assert again[0] == samples[5]


def test_the_loss_snippet_gives_the_ranking_loss_and_mle_term_of_the_candidates_with_their_shapes():
    snippet = readme_snippets("Using pieces in your project")[1]
    scope = {}
    exec(snippet, scope)
    loss, mle, rank, scores = scope["loss"], scope["mle"], scope["rank"], scope["scores"]
    batch, token_logprobs = scope["batch"], scope["token_logprobs"]
    assert scores.shape == (1, 3) and token_logprobs.shape == batch["candidate"].shape == (1, 3 + 4 + 2)
    assert torch.allclose(loss, mle + rank)
    # the ranking term by hand from the scores: d = 1 pairs (0,1), (1,2); d = 2 pair (0,2); margin 0.1 * d
    s = scores[0].detach()
    by_hand = (max(0, s[1] - s[0] + 0.1) + max(0, s[2] - s[1] + 0.1)) / 2 + max(0, s[2] - s[0] + 0.2)
    assert torch.allclose(rank.detach(), torch.as_tensor(by_hand, dtype=rank.dtype), atol=1e-6)
    # the MLE term is the mean negative log-prob of all 9 response tokens
    assert torch.allclose(mle.detach(), -token_logprobs.detach().sum() / 9, atol=1e-6)
    assert all(p.grad is not None for p in scope["net"].parameters() if p.requires_grad)
