"""VQA: the answers' normalization and score, the loader's VQA batches, fine-tuning a fusion checkpoint on VQA
shards (answer head, soft targets), `mmscale eval vqa`, `mmscale vqa`, int8 export, and 2-rank ZeRO-3 VQA
fine-tuning that resumes exactly after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpus import write_tar
from shardkit import jpeg_bytes

from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.vqa import AnswerTargets, answer_accuracy, answer_list, normalize_answer

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("raw,normalized", [
    ("Two", "2"), ("the dog.", "dog"), ("yes!", "yes"), ("dont", "don't"), ("1,000", "1000"), ("a red", "red"),
    ("none", "0"), ("3.5", "3.5"), ("  Red\tcar ", "red car"), ("black-and-white", "black and white"),
    ("what's this ?", "what's this"), ("An Apple", "apple"), ("isnt", "isn't")])
def test_answers_are_normalized_as_the_vqa_v2_evaluation_does(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("matching,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_ten_answers_score_the_mean_over_each_answer_left_out(matching, expected):
    """Hand-computed: with m of 10 answers equal to the prediction, leaving out one of the m leaves m - 1 matches,
    one of the others m: (m x min(1, (m-1)/3) + (10-m) x min(1, m/3)) / 10; m=2: (2/3 + 8 x 2/3) / 10 = 0.6.
    The answers disagree, so vqaEval.py processes their punctuation ("blue." matches "Blue!" predicted)."""
    answers = ["blue."] * matching + ["green", "teal", "cyan", "navy", "sky", "azure", "indigo", "cobalt", "sea",
                                      "ice"][:10 - matching]
    assert answer_accuracy("Blue!", answers) == pytest.approx(expected)


def test_ten_answers_are_compared_as_written_as_vqa_eval_does():
    """vqaEval.py normalizes the prediction fully but the human answers only by punctuation, and only when they
    disagree: "Red" is no match for "red", and ten unanimous "yes." keep their period."""
    assert answer_accuracy("red", ["red"] * 2 + ["Red"] * 8) == pytest.approx(0.6)
    assert answer_accuracy("two", ["2"] * 10) == 1.0  # the prediction's number word is mapped
    assert answer_accuracy("yes", ["yes."] * 10) == 0.0
    assert answer_accuracy("yes", ["yes."] * 9 + ["no"]) == 1.0


def test_fewer_answers_need_min_of_three_and_their_count():
    assert answer_accuracy("2", ["two"]) == 1.0  # one answer: an exact match after normalization
    assert answer_accuracy("dog", ["cat"]) == 0.0
    assert answer_accuracy("dog", ["dog", "cat"]) == 0.5
    assert answer_accuracy("dog", ["dog", "dog", "cat", "cat"]) == pytest.approx(2 / 3)
    assert answer_accuracy("dog", []) == 0.0


def test_soft_targets_and_the_answer_list():
    targets = AnswerTargets(["red", "blue", "green"]).targets([("red",) * 8 + ("Blue",) * 2, ("purple",), ("green",)])
    torch.testing.assert_close(targets, torch.tensor([[1.0, 2 / 3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    # each question's distinct answers count once; ties alphabetical
    assert answer_list([["red"] * 10, ["blue", "Red"], ["green"], ["blue"]], 2) == ["blue", "red"]
    with pytest.raises(ValueError, match="repeats"):
        AnswerTargets(["red", "red"])


def test_the_loader_yields_questions_and_soft_targets_and_counts_bad_vqa_samples(tmp_path, tokenizer):
    def sample(key: str, value, image: bytes | None = None) -> list[tuple[str, bytes]]:
        members = [(f"{key}.jpg", image if image is not None else jpeg_bytes(len(key)))]
        return members + ([(f"{key}.json", json.dumps(value).encode())] if value is not None else [])

    good = {"question": "what colour is it?", "answers": ["red"] * 9 + ["blue"], "question_type": "colour"}
    write_tar(tmp_path / "vqa-000000.tar", [
        *sample("a", good), *sample("b", {"question": "is it blue?", "answers": ["no", "no", "yes"]}),
        *sample("c", {"answers": ["red"]}), *sample("d", {"question": "what?", "answers": []}),
        *sample("e", good, image=b"not an image"), *sample("f", {"question": "what?", "answers": 5}),
        *sample("g", None)])
    loader = build_loader(DataConfig(image_size=32, context_length=16, workers=0, mlm_probability=0.0),
                          spec=str(tmp_path / "vqa-000000.tar"), tokenizer=tokenizer, batch_size=8, train=False,
                          rank=0, world_size=1, vqa=AnswerTargets(["red", "no", "yes"]))
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["keys"] == ["a", "b"]
    torch.testing.assert_close(batches[0]["answer_targets"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 2 / 3, 1 / 3]]))
    assert batches[0]["question_types"] == ["colour", ""]
    assert list(batches[0]["answers"][1]) == ["no", "no", "yes"]
    skipped = dict(loader.skipped)
    assert skipped.pop("missing_question") == 2 and skipped.pop("missing_answer") == 1
    assert skipped.pop("bad_json") == 1 and sum(skipped.values()) == 1  # the image that is not one


def test_answer_counts_of_each_ranks_share_of_the_shards_add_up_to_the_whole(tmp_path):
    """Each rank counts every world_size-th shard; their sum is the one-process count, a bad sample and a
    shard cut short are counted (not raised), and the list is the most frequent answers, ties alphabetical."""
    from mmscale.data.vqa import AnswerCount, answers_counted, count_answer_list, count_answers

    def sample(key: str, answers) -> list[tuple[str, bytes]]:
        return [(f"{key}.jpg", jpeg_bytes(1)), (f"{key}.json", json.dumps({"question": "q?", "answers": answers}).encode())]

    for index, answers in enumerate([["red"] * 3, ["Blue", "blue."], ["red", "green"], ["two", "2"], [], ["red"]]):
        write_tar(tmp_path / f"s-{index:06d}.tar", sample(f"k{index}", answers))
    (tmp_path / "s-000006.tar").write_bytes((tmp_path / "s-000000.tar").read_bytes()[:700])  # cut short
    spec = str(tmp_path / "s-{000000..000006}.tar")
    parts = [count_answers(spec, rank=rank, world_size=3) for rank in range(3)]
    assert [part.samples for part in parts] == [2, 1, 2] and [part.bad for part in parts] == [0, 1, 0]
    whole = sum(parts, AnswerCount())
    assert whole.counts == count_answers(spec).counts == {"red": 3, "blue": 1, "green": 1, "2": 1}
    assert len(whole.unreadable) == 1 and "s-000006.tar" in whole.unreadable[0]
    with pytest.warns(UserWarning, match="1 samples without a question or answer, 1 unreadable"):
        assert answers_counted(whole, 2, spec) == ["red", "2"] == count_answer_list(spec, 2)


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmscale.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> dict[str, Path]:
    """Generated shapes VQA shards (colour / shape / background questions), a tokenizer for them, and an untrained
    tiny fusion checkpoint saved as mmscale saves one (what VQA fine-tuning starts from)."""
    from mmscale.data.text import load_tokenizer, special_token_ids
    from mmscale.models import ModelConfig, build_model
    from mmscale.shards.synthetic import COLOURS, SHAPES, make_vqa_shards, vqa_questions
    from mmscale.shards.tokenizer_train import train_wordpiece

    root = tmp_path_factory.mktemp("vqa")
    make_vqa_shards(root / "train", 320, corpus="shapes", seed=0)
    make_vqa_shards(root / "val", 64, corpus="shapes", seed=1)
    texts = [question.text for question in vqa_questions("shapes")] + [" ".join([*COLOURS, *SHAPES])]
    train_wordpiece(texts * 20, vocab_size=120, output_dir=root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer),
                        token_ids=special_token_ids(tokenizer))
    model.save(root / "fusion", tokenizer=tokenizer)
    return {"train": root / "train", "val": root / "val", "tokenizer": root / "tokenizer", "fusion": root / "fusion",
            "root": root}


@pytest.fixture(scope="module")
def vqa_finetuned(vqa_data) -> Path:
    output = vqa_data["root"] / "run"
    result = _cli("finetune", "--checkpoint", str(vqa_data["fusion"]), "--config", "configs/finetune/vqa.yaml",
                  f"data.train={vqa_data['train']}", f"data.val={vqa_data['val']}", f"output_dir={output}",
                  "train.samples=4480", "train.lr=0.001", "train.warmup_steps=10", "data.workers=0",
                  "vqa.answers=12", "train.progress=false", "train.tensorboard=false")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return output


def test_a_fusion_checkpoint_fine_tuned_on_vqa_beats_the_question_only_prior(vqa_finetuned, vqa_data, tmp_path):
    """Fine-tuning writes the answer list (12 answers: 6 colours, 3 shapes, 3 backgrounds), trains and logs the VQA
    loss, validates with VQA accuracy per question type; `mmscale eval vqa` scores the saved model far above the
    question-only prior and writes the per-answer report."""
    answers = json.loads((vqa_finetuned / "vqa_answers.json").read_text())["answers"]
    assert len(answers) == 12 and {"red", "circle", "gray"} <= set(answers)
    assert json.loads((vqa_finetuned / "final" / "mmscale.json").read_text())["vqa_answers"] == answers
    records = [json.loads(line) for line in (vqa_finetuned / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["vqa_loss"] < 0.6 * train[0]["vqa_loss"]
    evaluation = [r for r in records if r["kind"] == "eval"][-1]
    assert {"vqa_accuracy_colour", "vqa_accuracy_shape", "vqa_accuracy_background"} <= set(evaluation)
    report = tmp_path / "report"
    result = _cli("eval", "vqa", "--checkpoint", str(vqa_finetuned / "final"), "--data", str(vqa_data["val"]),
                  "--context-length", "32", "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["questions"] == 192 and scores["question_only_prior"] <= 0.4
    assert scores["accuracy"] >= scores["question_only_prior"] + 0.3, scores
    assert scores["accuracy"] == pytest.approx(evaluation["vqa_accuracy"], abs=0.03)  # bf16 training, fp32 here
    assert {"accuracy_colour", "accuracy_shape", "accuracy_background"} <= set(scores)
    per_answer = json.loads((report / "report.json").read_text())
    assert sum(per_answer[answer]["support"] for answer in answers if answer in per_answer) == 192
    assert (report / "report.txt").is_file() and (report / "confusion.png").stat().st_size > 0


def test_mmscale_vqa_answers_from_a_float_and_an_int8_export_alike(vqa_finetuned, vqa_data, tmp_path):
    """`mmscale export --quantize int8` keeps the answer head and list; the exported model's VQA accuracy is within
    0.02 of the float model's, and `mmscale vqa` gives the same top answer from both."""
    import tarfile

    exported = tmp_path / "int8"
    result = _cli("export", "--checkpoint", str(vqa_finetuned / "final"), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = {}
    for name, folder in (("float", vqa_finetuned / "final"), ("int8", exported)):
        result = _cli("eval", "vqa", "--checkpoint", str(folder), "--data", str(vqa_data["val"]), "--context-length", "32")
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[name] = json.loads(result.stdout.strip().splitlines()[-1])["accuracy"]
    assert abs(accuracy["int8"] - accuracy["float"]) <= 0.02, accuracy
    with tarfile.open(next(vqa_data["val"].glob("*.tar"))) as tar:
        (tmp_path / "image.jpg").write_bytes(tar.extractfile(tar.getmembers()[0].name.split(".")[0] + ".jpg").read())
    tops = []
    for folder in (vqa_finetuned / "final", exported):
        result = _cli("vqa", "--checkpoint", str(folder), "--image", str(tmp_path / "image.jpg"), "--question",
                      "what colour is the background?", "--top", "3", "--context-length", "32")
        assert result.returncode == 0, result.stderr[-3000:]
        answered = json.loads(result.stdout.strip().splitlines()[-1])["answers"]
        assert len(answered) == 3 and answered[0]["probability"] >= answered[1]["probability"]
        tops.append(answered[0]["answer"])
    assert tops[0] == tops[1] and tops[0] in ("white", "gray", "black")



def test_lora_vqa_fine_tuning_trains_the_answer_head_and_adapters_and_saves_them_merged(vqa_data, tmp_path):
    """With lora.enabled=true the towers train through adapters (self- and cross-attention) and the answer head
    fully; final/ holds the merged towers and the trained head, which eval vqa reads."""
    from safetensors.torch import load_file

    output = tmp_path / "lora"
    result = _cli("finetune", "--checkpoint", str(vqa_data["fusion"]), "--config", "configs/finetune/vqa.yaml",
                  f"data.train={vqa_data['train']}", f"output_dir={output}", "lora.enabled=true",
                  "train.deepspeed=configs/deepspeed/zero0.json", "train.samples=640", "train.lr=0.001",
                  "data.workers=0", "vqa.answers=12", "train.progress=false", "train.tensorboard=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA r=8 trains" in result.stdout + result.stderr
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    head = load_file(output / "final" / "mmscale_heads.safetensors")
    # the head trained (its bias starts at zero) and was saved with the merged model
    assert head["vqa_head.out.weight"].shape == (12, 256) and head["vqa_head.out.bias"].abs().sum() > 0
    result = _cli("eval", "vqa", "--checkpoint", str(output / "final"), "--data", str(vqa_data["val"]),
                  "--context-length", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads(result.stdout.strip().splitlines()[-1])
    assert merged["questions"] == 192
    # the adapter keeps the head beside it: exporting adapter/ (merged into its base) scores as final/ does
    result = _cli("export", "--checkpoint", str(output / "adapter"), "--out", str(tmp_path / "from-adapter"),
                  "--quantize", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    result = _cli("eval", "vqa", "--checkpoint", str(tmp_path / "from-adapter"), "--data", str(vqa_data["val"]),
                  "--context-length", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(merged["accuracy"], abs=0.01)

def test_a_dual_encoder_checkpoint_is_refused_naming_model_fusion_layers(vqa_data, tmp_path):
    from mmscale.data.text import load_tokenizer
    from mmscale.models import ModelConfig, build_model

    tokenizer = load_tokenizer(vqa_data["tokenizer"])
    build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer)).save(tmp_path / "dual", tokenizer=tokenizer)
    result = _cli("finetune", "--checkpoint", str(tmp_path / "dual"), "--config", "configs/finetune/vqa.yaml",
                  f"data.train={vqa_data['train']}", f"output_dir={tmp_path / 'run'}", "data.workers=0",
                  "train.samples=64", "train.progress=false")
    assert result.returncode == 2 and "model.fusion_layers" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_vqa_on_two_zero3_ranks_resumes_exactly_after_sigkill(vqa_data, tmp_path):
    """A new tiny fusion model with an answer head, fine-tuned for VQA on 2 ranks under ZeRO-3 through the launcher:
    rank 1 SIGKILLed after the checkpoint of step 4, the resumed run's losses equal the uninterrupted run's."""
    from test_train import launch_ranks, metrics, run_overrides

    corpus = {"train": vqa_data["train"], "tokenizer": vqa_data["tokenizer"]}
    common = ["train.samples=256", "train.save_every_steps=4", "model.fusion_layers=4", "loss.objective=vqa",
              "data.mlm_probability=0", "vqa.answers=12", "data.context_length=32"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    code, log = launch_ranks(2, run_overrides(corpus, straight, *common))
    assert code == 0, log[-3000:]
    code, log = launch_ranks(2, run_overrides(corpus, crashed, *common), env={"MMSCALE_KILL_AFTER_CHECKPOINT": "1:4"})
    assert code != 0 and not (crashed / "final").exists()
    code, log = launch_ranks(2, run_overrides(corpus, crashed, *common))
    assert code == 0 and "at step 4" in log, log[-3000:]
    losses = {r["step"]: r["vqa_loss"] for r in metrics(straight)}
    resumed = {r["step"]: r["vqa_loss"] for r in metrics(crashed)}
    assert all(value > 0 for value in losses.values())
    assert {step: resumed[step] for step in range(5, 9)} == {step: losses[step] for step in range(5, 9)}
    assert json.loads((crashed / "final" / "mmscale.json").read_text())["vqa_answers"] == \
        json.loads((straight / "vqa_answers.json").read_text())["answers"]
    # the two ranks counted half the shards each; their list is the one a single process counts
    from mmscale.data.vqa import count_answer_list

    assert json.loads((straight / "vqa_answers.json").read_text())["answers"] == count_answer_list(
        str(vqa_data["train"]), 12)


def test_vqa_flop_count_matches_torch_flop_counter(tokenizer):
    """vqa_flops_per_sample (MFU of VQA fine-tuning) counts the image tower, the question's fused pass and the
    answer head as torch's own counter does."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmscale.losses import LossConfig, VqaObjective
    from mmscale.models import ModelConfig, build_model
    from mmscale.models.flops import vqa_flops_per_sample

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer),
                        vqa_answers=[f"answer {i}" for i in range(300)])
    objective = VqaObjective(model, LossConfig(objective="vqa"))
    ids = torch.randint(5, len(tokenizer), (8, 32))
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        objective(images, ids, torch.ones_like(ids), answer_targets=torch.rand(8, 300)).total.backward()
    assert 8 * vqa_flops_per_sample(model, context_length=32) == pytest.approx(counter.get_total_flops(), rel=0.10)
