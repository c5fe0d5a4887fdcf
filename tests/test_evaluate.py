"""Evaluation: HellaSwag scoring on a file the tests write (answers forced by construction), the
validation loss, ranks splitting the examples, and the command line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from gpt.checkpoint import load_checkpoint, save_checkpoint
from gpt.data import DataLoader
from gpt.evaluate import HellaSwagError, hellaswag_accuracy, load_hellaswag, main, score_endings, validation_loss
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import VOCAB_SIZE, encode
from gpt_kernels.registry import use_kernels
from synthetic_data import random_corpus

ROOT = Path(__file__).resolve().parents[1]
BOOST = 10.0
# A token the stub predicts costs -log(e^B / (e^B + V - 1)); any other token at least log(V).
PREDICTED_LOSS = math.log1p((VOCAB_SIZE - 1) * math.exp(-BOOST))

# Example 1 has a forced answer: the stub predicts its right ending token by token, from the
# context's last token on. Example 2 separates acc from acc_norm: its right ending (index 2) is
# long, with every token predicted but the first, so it has the lowest MEAN loss, while the
# one-token ending " left" (never predicted) has the lowest SUM.
EXAMPLES = [
    {"ctx": "Bob fixed the old bicycle and", "label": 2,
     "endings": ["purple elephants", "seven bicycles", "rode it to town", "sang loudly today"]},
    {"ctx": "Alice opened the heavy door,", "label": 2,
     "endings": ["left", "eats green apples", "then walked into a quiet garden", "jumped over the fence."]},
]


@pytest.fixture(autouse=True)
def _reference_kernels():
    with use_kernels("none"):
        yield


class BigramStub(torch.nn.Module):
    """A 'model' that gives ``successor[token]`` a logit of BOOST (every other token 0) after each
    token that has a successor, and a uniform distribution after any other."""

    def __init__(self, pairs: dict[int, int], block_size: int):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=VOCAB_SIZE, n_layer=1, n_head=1, n_embd=8)
        successor = torch.full((VOCAB_SIZE,), -1, dtype=torch.long)
        for token, following in pairs.items():
            successor[token] = following
        self.register_buffer("successor", successor)

    def forward(self, idx, targets=None):
        nxt = self.successor[idx]
        boost = torch.where(nxt >= 0, BOOST, 0.0)[..., None]
        logits = torch.zeros(*idx.shape, VOCAB_SIZE, device=idx.device)
        return logits.scatter(-1, nxt.clamp_min(0)[..., None], boost), None


def chain(tokens: list[int]) -> dict[int, int]:
    return dict(zip(tokens[:-1], tokens[1:]))


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    lines = [json.dumps({**e, "ind": i, "activity_label": "test", "split": "val"}) for i, e in enumerate(EXAMPLES)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def stub():
    first, second = EXAMPLES
    right_1 = encode(first["ctx"])[-1:] + encode(" " + first["endings"][first["label"]])
    right_2 = encode(" " + second["endings"][second["label"]])  # its first token is NOT predicted
    # The block (8) is shorter than context + ending: the windows keep the last 8 tokens.
    return BigramStub({**chain(right_1), **chain(right_2)}, block_size=8).to(DEVICE)


def test_forced_answer_and_acc_norm_as_documented(stub, hellaswag_file):
    examples = load_hellaswag(hellaswag_file)
    assert len(encode(" left")) == 1 and len(encode(" then walked into a quiet garden")) == 6
    sums, means = score_endings(stub, examples, torch.device(DEVICE))
    # Example 1's right ending: every one of its 4 tokens predicted; mean = sum / its token count.
    n_tokens = len(encode(" rode it to town"))
    assert sums[0, 2].item() == pytest.approx(n_tokens * PREDICTED_LOSS, rel=1e-4)
    assert means[0, 2].item() == pytest.approx(PREDICTED_LOSS, rel=1e-4)
    assert torch.allclose(means * torch.tensor([[len(encode(" " + e)) for e in x["endings"]] for x in examples]), sums)
    assert sums[0].argmin() == 2 and means[0].argmin() == 2
    assert sums[1].argmin() == 0 and means[1].argmin() == 2  # acc picks " left", acc_norm the right one
    scores = hellaswag_accuracy(stub, hellaswag_file, DEVICE, progress=False)
    assert scores == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_ranks_split_the_examples(stub, tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES + EXAMPLES[:1]))
    whole = hellaswag_accuracy(stub, path, DEVICE, progress=False)
    # Without a process group each rank returns its share: examples 0 and 2, then example 1.
    shares = [hellaswag_accuracy(stub, path, DEVICE, rank=rank, world_size=2, batch_size=1, progress=False)
              for rank in (0, 1)]
    assert [s["n"] for s in shares] == [2, 1] and whole["n"] == 3
    for key in ("acc", "acc_norm"):
        assert sum(s[key] * s["n"] for s in shares) == pytest.approx(whole[key] * 3)
    assert hellaswag_accuracy(stub, path, DEVICE, limit=1, progress=False) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}


@pytest.fixture(scope="module")
def gpt_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=VOCAB_SIZE, n_layer=1, n_head=2, n_embd=32)).to(DEVICE)


def test_batching_and_padding_change_no_score(gpt_model, hellaswag_file):
    examples = load_hellaswag(hellaswag_file) * 2
    examples[3] = {**examples[3], "ctx": "A much longer context, one that fills the whole block of sixteen tokens"}
    sums, means = score_endings(gpt_model, examples, torch.device(DEVICE))
    for i, example in enumerate(examples):
        one_sum, one_mean = score_endings(gpt_model, [example], torch.device(DEVICE))
        torch.testing.assert_close(one_sum[0], sums[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one_mean[0], means[i], rtol=1e-5, atol=1e-5)
    compiled = torch.compile(gpt_model)  # HellaSwag unwraps it: no graph is ever compiled here
    assert hellaswag_accuracy(compiled, hellaswag_file, DEVICE, progress=False) == \
        hellaswag_accuracy(gpt_model, hellaswag_file, DEVICE, progress=False)
    assert gpt_model.training  # the mode it came in with


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not a JSON object"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d"], "label": 0}), "4 non-empty strings"),
    (json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}), "'label' must be an int"),
    (json.dumps({"endings": ["b", "c", "d", "e"], "label": 1}), "'ctx', 'endings' and 'label'"),
])
def test_malformed_files_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(HellaSwagError, match=message):
        load_hellaswag(path)
    with pytest.raises(HellaSwagError, match="no such HellaSwag file"):
        load_hellaswag(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return random_corpus(tmp_path_factory.mktemp("shards"), seed=0, vocab=1000, train_tokens=5_000, val_tokens=2_000)


def test_validation_loss_and_perplexity(gpt_model, data_dir):
    result = validation_loss(gpt_model, data_dir, batch_size=2, seq_len=16, batches=3, device=DEVICE)
    loader = DataLoader(data_dir, "val", 2, 16, vocab_size=VOCAB_SIZE)
    with torch.no_grad():
        losses = [gpt_model(*(t.to(DEVICE) for t in loader.next_batch()))[1].item() for _ in range(3)]
    assert result["val_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    with pytest.raises(ValueError, match="block size"):
        validation_loss(gpt_model, data_dir, batch_size=2, seq_len=17, batches=1, device=DEVICE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt_model):
    state = dict(model=gpt_model.state_dict(), optimizer={}, step=1, config=gpt_model.config.to_dict())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, state)


def test_cli_reports_val_loss_and_hellaswag(checkpoint, data_dir, hellaswag_file, gpt_model, capsys):
    code = main(["--checkpoint", str(checkpoint), "--data", str(data_dir), "--hellaswag", str(hellaswag_file),
                 "--batches", "2", "--batch-size", "2", "--seq-len", "16", "--device", DEVICE, "--dtype", "float32",
                 "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "val loss" in out and "hellaswag acc" in out
    results = json.loads(out.strip().splitlines()[-1])
    assert results["hellaswag_n"] == 2
    expected = hellaswag_accuracy(gpt_model, hellaswag_file, DEVICE, progress=False)
    assert (results["hellaswag_acc"], results["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])
    assert main(["--checkpoint", str(checkpoint), "--hellaswag", str(hellaswag_file.parent / "none.jsonl"),
                 "--device", DEVICE]) == 2
    assert "no such HellaSwag file" in capsys.readouterr().err


def test_torchrun_two_ranks_sum_their_counts(checkpoint, tmp_path):
    """Under torchrun (gloo, CPU) the ranks split five examples 3/2 and all-reduce the counts."""
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (EXAMPLES * 3)[:5]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt.evaluate",
           "--checkpoint", str(checkpoint), "--hellaswag", str(path), "--device", "cpu", "--batch-size", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPT_KERNELS": "none"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    json_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1  # rank 0 alone prints
    state = load_checkpoint(checkpoint)
    model = GPT(GPTConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    expected = hellaswag_accuracy(model, path, "cpu", progress=False)
    results = json.loads(json_lines[0])
    assert results["hellaswag_n"] == 5
    assert (results["hellaswag_acc"], results["hellaswag_acc_norm"]) == (expected["acc"], expected["acc_norm"])
