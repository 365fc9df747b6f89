"""Evaluating a fusion model (issue 27): masked-word accuracy with the image and with a blank one (`mmscale eval
mlm`), retrieval re-ranked by ITM (`mmscale eval retrieval --rerank K`), `mmscale match`, and the ITM / MLM
validation metrics of training, also over real gloo ranks. The models are tiny and random: the tests pin the
counting and the ranking rules, not what a trained model scores."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from corpus import read_samples
from distkit import free_port, save_from_every_rank

from mmscale.cli import main
from mmscale.data.config import DataConfig
from mmscale.data.loader import build_loader
from mmscale.data.tars import sample_caption
from mmscale.data.text import IGNORE_INDEX, special_token_ids
from mmscale.eval.metrics import retrieval_metrics
from mmscale.models import ModelConfig, build_model, load_model

LISTED = ["red", "Magenta", "CIRCLE", "gray"]  # matched case-insensitively; magenta is several pieces here
CONTEXT = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """24 rendered shapes in 3 shards, and their captions ("a red circle on a gray background")."""
    from mmscale.shards.synthetic import make_synthetic_shards

    root = tmp_path_factory.mktemp("fusion-eval")
    make_synthetic_shards(root / "val", 24, samples_per_shard=8, seed=5)
    captions = [sample_caption(sample) for shard in sorted(glob.glob(str(root / "val" / "*.tar")))
                for sample in read_samples(shard)]
    return {"spec": str(root / "val"), "captions": captions, "root": root}


@pytest.fixture(scope="module")
def fusion_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fusion_layers=4), vocab_size=len(tokenizer),
                        token_ids=special_token_ids(tokenizer))
    return model.save(tmp_path_factory.mktemp("fusion") / "final", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tokenizer))
    return model.save(tmp_path_factory.mktemp("dual") / "final", tokenizer=tokenizer)


def run(capsys, *args) -> tuple[int, list[str], str]:
    """`mmscale ARGS` in this process: exit code, stdout lines, stderr."""
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def loader(spec: str, tokenizer, batch_size: int = 8, *, captions=None):
    return build_loader(DataConfig(image_size=64, context_length=CONTEXT, workers=0, mlm_probability=0.0),
                        spec=spec, tokenizer=tokenizer, batch_size=batch_size, train=False, rank=0, world_size=1,
                        captions=captions)


def listed_pieces(tokenizer, word: str) -> list[str]:
    """The word pieces of a listed word that masking targets ([UNK] is never a target)."""
    return [piece for piece in tokenizer.tokenize(word) if piece != tokenizer.unk_token]


# --- masked words ---------------------------------------------------------------------------------------------


def test_word_masking_masks_every_piece_of_the_listed_whole_words_only(tokenizer):
    """Expected positions built word by word (BERT splits at spaces and punctuation), independently of the
    encoder's offsets: listed words in any case, all their pieces; not "reddish" or "circles"; and not "redder"
    cut to its first piece "red" by truncation."""
    from mmscale.eval.mlm import EvalMasking

    words = frozenset(word.casefold() for word in LISTED)
    assert len(listed_pieces(tokenizer, "magenta")) > 1 and tokenizer.tokenize("redder")[0] == "red"
    for captions, context in ((["a Red circle, on a magenta background", "reddish circles of the shard",
                                "the RED star", "red magenta red MAGENTA"], 32),
                              (["a red circle on a redder", "magenta"], 8)):
        batch = EvalMasking(tokenizer, context_length=context, words=words).encode_and_mask(captions, seed=123)
        for row, caption in enumerate(captions):
            tokens, chosen = [tokenizer.cls_token], [False]
            for word in re.findall(r"\w+|[^\w\s]", caption):
                pieces = tokenizer.tokenize(word)
                fits = len(tokens) + len(pieces) <= context - 1  # [SEP] takes the last place
                chosen += [word.casefold() in words and fits and piece != tokenizer.unk_token for piece in pieces]
                tokens += pieces
            tokens, chosen = tokens[:context - 1] + [tokenizer.sep_token], torch.tensor(chosen[:context - 1] + [False])
            length = len(tokens)
            ids = batch["input_ids"][row, :length]
            assert ids.tolist() == tokenizer.convert_tokens_to_ids(tokens)
            assert torch.equal(batch["mlm_labels"][row, :length] != IGNORE_INDEX, chosen), caption
            assert (batch["mlm_labels"][row, length:] == IGNORE_INDEX).all()
            masked = batch["mlm_input_ids"][row, :length]
            assert masked[chosen].eq(tokenizer.mask_token_id).all() and torch.equal(masked[~chosen], ids[~chosen])
            assert torch.equal(batch["mlm_labels"][row, :length][chosen], ids[chosen])
        assert (batch["mlm_labels"] != IGNORE_INDEX).any()


def test_eval_mlm_counts_every_piece_of_the_listed_words(fusion_dir, data, tokenizer, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(LISTED) + "\n")
    listed = {word.casefold() for word in LISTED}
    expected = sum(len(listed_pieces(tokenizer, word)) for caption in data["captions"] for word in caption.split()
                   if word.casefold() in listed)
    with_words = sum(any(word in listed and listed_pieces(tokenizer, word) for word in caption.split())
                     for caption in data["captions"])  # "gray" is all [UNK] here: nothing to mask
    assert any("magenta" in caption for caption in data["captions"]) and expected > with_words
    code, lines, _ = run(capsys, "eval", "mlm", "--checkpoint", fusion_dir, "--data", data["spec"], "--words", words,
                         "--batch-size", 8, "--context-length", CONTEXT, "--workers", 0, "--tokenizer", fusion_dir)
    assert code == 0
    result = json.loads(lines[-1])
    assert set(result) == {"accuracy", "accuracy_without_image", "masked", "captions", "samples"}
    assert result["masked"] == expected and result["captions"] == with_words and result["samples"] == 24
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_without_image"] <= 1
    assert any(line.strip().startswith("accuracy_without_image:") for line in lines)


@pytest.mark.parametrize("kind", ["fusion", "dual"])
def test_the_second_pass_sees_a_blank_gray_image(kind, fusion_dir, dual_dir, data, tokenizer):
    """Each masked batch runs twice, with its images and with uint8 128 everywhere: a fusion model's predictions
    change with the image, a dual encoder's do not."""
    from mmscale.eval.mlm import EvalMasking, count_masked_words

    model = load_model(fusion_dir if kind == "fusion" else dual_dir).eval()
    calls = []

    class Recording:
        def mlm_logits(self, *args, images):
            logits, targets = model.mlm_logits(*args, images=images)
            calls.append((images.clone(), logits))
            return logits, targets

    masking = EvalMasking(tokenizer, context_length=CONTEXT, words=frozenset({"red", "circle"}))
    counts = count_masked_words(Recording(), loader(data["spec"], tokenizer, captions=masking), device=model.device)
    assert counts.masked > 0 and len(calls) % 2 == 0
    for (images, logits), (gray, gray_logits) in zip(calls[::2], calls[1::2]):
        assert (gray == 128).all() and not (images == 128).all()
        assert torch.equal(logits, gray_logits) == (kind == "dual")


def test_eval_mlm_of_a_dual_encoder_gives_equal_accuracies_and_random_masks_do_not_depend_on_batching(
        dual_dir, data, capsys):
    results = []
    for batch_size in (8, 5):
        code, lines, _ = run(capsys, "eval", "mlm", "--checkpoint", dual_dir, "--data", data["spec"],
                             "--batch-size", batch_size, "--workers", 0)
        assert code == 0
        results.append(json.loads(lines[-1]))
    assert results[0] == results[1]  # masks drawn per caption, from its text
    assert results[0]["accuracy"] == results[0]["accuracy_without_image"] and results[0]["masked"] > 0


def test_eval_mlm_mistakes_are_one_line_errors(dual_dir, data, tokenizer, tmp_path, capsys):
    headless = build_model(ModelConfig(preset="tiny", mlm_head=False), vocab_size=len(tokenizer))
    headless = headless.save(tmp_path / "headless", tokenizer=tokenizer)
    code, _, err = run(capsys, "eval", "mlm", "--checkpoint", headless, "--data", data["spec"], "--workers", 0)
    assert code == 2 and "has no trained MLM head" in err and "model.mlm_head=true" in err
    absent = tmp_path / "absent.txt"
    absent.write_text("purple\norange\n")
    code, _, err = run(capsys, "eval", "mlm", "--checkpoint", dual_dir, "--data", data["spec"], "--words", absent,
                       "--workers", 0)
    assert code == 2 and "nothing was masked: no caption of the 24" in err and "any of the 2 words" in err
    phrase = tmp_path / "phrase.txt"
    phrase.write_text("red\nred circle\n")
    code, _, err = run(capsys, "eval", "mlm", "--checkpoint", dual_dir, "--data", data["spec"], "--words", phrase,
                       "--workers", 0)
    assert code == 2 and "line 2: 'red circle' is 2 words" in err


# --- re-ranked retrieval --------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_label", [False, True], ids=["caption-or-image", "label"])
def test_candidates_rank_as_retrieval_metrics_and_reranking_reorders_them(by_label):
    """On a COCO-like set (4 captions per image, repeated captions, some unlabelled pairs): the candidates'
    contrastive ranks give retrieval_metrics' recall exactly (also where the same `.cls` label counts); with K = 1
    re-ranking moves nothing; an ITM that knows the answer puts a correct candidate first whenever one is among
    the top K."""
    from test_eval_shared import whole_set

    from mmscale.eval.metrics import same_label
    from mmscale.eval.rerank import reranked_recall, top_candidates

    data = whole_set()
    image = torch.nn.functional.normalize(data["images"], dim=-1)
    text = torch.nn.functional.normalize(data["texts"], dim=-1)
    captions, pictures = data["caption_groups"], data["image_groups"]
    labels = data["labels"] if by_label else None
    _, caption_index = torch.unique(captions, return_inverse=True)

    def correct_of(rows):
        correct = (captions[rows][:, None] == captions[None, :]) | (pictures[rows][:, None] == pictures[None, :])
        return correct | same_label(labels[rows], labels) if by_label else correct

    expected = retrieval_metrics(data["images"], data["texts"], caption_groups=captions, image_groups=pictures,
                                 label_groups=labels)
    for direction, queries, keys, results in (("i2t", image, text, caption_index), ("t2i", text, image, pictures)):
        for k in (1, 5):
            candidates = top_candidates(queries, keys, correct_of=correct_of, results=results, k=k)
            for n in (1, 5, 10):
                assert float((candidates.rank < n).double().mean()) == pytest.approx(expected[f"{direction}_r{n}"])
            shuffled = reranked_recall(candidates, torch.rand(candidates.result.shape))  # any ITM at all
            assert {n: shuffled[n] for n in (1, 5, 10) if n >= k} == pytest.approx(
                {n: expected[f"{direction}_r{n}"] for n in (1, 5, 10) if n >= k})  # K = 1: nothing moves
        knowing = reranked_recall(candidates, candidates.correct.float())  # k = 5: correct ones come first
        assert knowing[1] == pytest.approx(expected[f"{direction}_r5"])
        assert expected[f"{direction}_r1"] < expected[f"{direction}_r5"]


def test_eval_retrieval_with_one_candidate_reranks_nothing(fusion_dir, data, capsys):
    """The JSON holds the contrastive and the re-ranked recall; re-ranking a single candidate changes nothing."""
    code, lines, _ = run(capsys, "eval", "retrieval", "--checkpoint", fusion_dir, "--data", data["spec"],
                         "--rerank", 1, "--batch-size", 8, "--workers", 0)
    assert code == 0
    result = json.loads(lines[-1])
    names = [f"{direction}_r{n}" for direction in ("i2t", "t2i") for n in (1, 5, 10)]
    assert all(0 <= result[name] <= 1 and 0 <= result[f"rerank_{name}"] <= 1 for name in names)
    assert all(result[f"rerank_{name}"] == result[name] for name in names)
    assert 0 <= result["itm_accuracy"] <= 1 and result["rerank"] == 1 and result["samples"] == 24


def test_eval_retrieval_by_label_counts_more_results_as_correct(fusion_dir, data, capsys):
    """`--match-labels`: shapes' labels are their colours, shared by several captions, so a result with the query's
    colour is correct too: no recall falls, contrastive or re-ranked, and some rise."""
    common = ("eval", "retrieval", "--checkpoint", fusion_dir, "--data", data["spec"], "--rerank", 4,
              "--batch-size", 8, "--workers", 0)
    code, lines, _ = run(capsys, *common)
    assert code == 0
    strict = json.loads(lines[-1])
    code, lines, _ = run(capsys, *common, "--match-labels")
    assert code == 0
    by_label = json.loads(lines[-1])
    names = [f"{prefix}{direction}_r{n}" for prefix in ("", "rerank_") for direction in ("i2t", "t2i")
             for n in (1, 5, 10)]
    assert all(by_label[name] >= strict[name] for name in names)
    assert any(by_label[name] > strict[name] for name in names)


def test_reranking_every_candidate_is_retrieval_by_blips_score(fusion_dir, data, tokenizer):
    """With K above the number of results the ranking is BLIP's: the same recall as ranking every distinct
    (image, caption) by the ITM "match" logit plus the contrastive cosine, with retrieval_metrics' rules (same
    caption or same image is correct, copies are one result, ties count for the query)."""
    from mmscale.eval.rerank import rerank_metrics

    model = load_model(fusion_dir, mlm_head=False).eval()
    batches = list(loader(data["spec"], tokenizer))
    images = torch.cat([batch["images"] for batch in batches])
    ids = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, CONTEXT - b["input_ids"].shape[1])) for b in batches])
    mask = torch.cat([torch.nn.functional.pad(b["attention_mask"], (0, CONTEXT - b["attention_mask"].shape[1]))
                      for b in batches])
    _, picture = torch.unique(images.flatten(1), dim=0, return_inverse=True)
    _, caption = torch.unique(ids * mask, dim=0, return_inverse=True)
    assert len(caption.unique()) < len(caption)  # repeated captions are in the test
    first_image = [int((picture == p).nonzero()[0]) for p in range(int(picture.max()) + 1)]
    first_caption = [int((caption == c).nonzero()[0]) for c in range(int(caption.max()) + 1)]
    grid = torch.cartesian_prod(torch.arange(len(first_image)), torch.tensor(first_caption))
    with torch.no_grad():
        tokens = model.image_tokens(images[first_image])  # what model.itm_scores runs, each image once
        logits = model.itm_logits(tokens[grid[:, 0]], ids[grid[:, 1]], mask[grid[:, 1]])
        cosine = (torch.nn.functional.normalize(model.encode_images(images[first_image]).float(), dim=-1)
                  @ torch.nn.functional.normalize(model.encode_texts(ids[first_caption], mask[first_caption]).float(),
                                                  dim=-1).T)
    score = logits.float()[:, 1].view(len(first_image), len(first_caption)) + cosine  # [image, caption]

    def recall(query_ids, scores_of, result_of) -> dict[int, float]:
        ranks = []
        for i in range(len(caption)):
            correct = (caption == caption[i]) | (picture == picture[i])
            best = max(scores_of(i)[result_of[j]] for j in range(len(caption)) if correct[j])
            wrong = {int(result_of[j]) for j in range(len(caption)) if not correct[j]}
            ranks.append(sum(bool(scores_of(i)[r] > best) for r in wrong))
        return {n: sum(rank < n for rank in ranks) / len(ranks) for n in (1, 5, 10)}

    i2t = recall(picture, lambda i: score[picture[i]], caption)
    t2i = recall(caption, lambda i: score[:, caption[i]], picture)
    metrics = rerank_metrics(model, lambda: loader(data["spec"], tokenizer), k=1000, device=model.device,
                             context_length=CONTEXT, batch_size=8)
    assert {n: metrics[f"rerank_i2t_r{n}"] for n in (1, 5, 10)} == pytest.approx(i2t)
    assert {n: metrics[f"rerank_t2i_r{n}"] for n in (1, 5, 10)} == pytest.approx(t2i)
    assert metrics["rerank_itm_pairs"] == len(first_image) * len(first_caption)


# --- match, and what a dual encoder cannot do ------------------------------------------------------------------


def test_match_prints_the_itm_probability_of_each_text_in_order(fusion_dir, data, tokenizer, tmp_path, capsys):
    from mmscale.shards.synthetic import make_image_folder
    from mmscale.data.text import CaptionEncoder
    from mmscale.eval.use import read_image

    image = make_image_folder(tmp_path / "image", 1, seed=1)[0].image_path
    texts = ["a red circle on a gray background", "a blue square", "a magenta triangle on a black background"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    code, lines, _ = run(capsys, "match", "--checkpoint", fusion_dir, "--image", image, "--texts",
                         tmp_path / "texts.txt", "--batch-size", 2)
    assert code == 0 and len(lines) == len(texts) + 1
    printed = [float(line.split()[0]) for line in lines[:-1]]
    assert [line.split(None, 1)[1] for line in lines[:-1]] == texts
    result = json.loads(lines[-1])
    model = load_model(fusion_dir, mlm_head=False).eval()
    encoded = CaptionEncoder(tokenizer, context_length=64, mlm_probability=0.0).encode(texts)
    with torch.no_grad():
        expected = model.itm_scores(read_image(image, 64)[None].expand(3, -1, -1, -1), encoded["input_ids"],
                                    encoded["attention_mask"])
    assert result["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert printed == pytest.approx(expected.tolist(), abs=1e-4)
    assert result["best"] == texts[int(expected.argmax())]


def test_a_dual_encoder_is_refused_for_rerank_and_match(dual_dir, data, tmp_path, capsys):
    from mmscale.shards.synthetic import make_image_folder

    image = make_image_folder(tmp_path / "image", 1)[0].image_path
    (tmp_path / "texts.txt").write_text("a red circle\n")
    for args in (["eval", "retrieval", "--checkpoint", dual_dir, "--data", data["spec"], "--rerank", 5,
                  "--workers", 0],
                 ["match", "--checkpoint", dual_dir, "--image", image, "--texts", tmp_path / "texts.txt"]):
        code, _, err = run(capsys, *args)
        last = err.strip().splitlines()[-1]  # after the weight-loading progress bar
        assert code == 2 and last.startswith(f"mmscale {args[0]}: error: ") and "dual encoder" in last
        assert "model.fusion_layers > 0" in last


# --- validation during training --------------------------------------------------------------------------------


def _expected_itm_accuracy(model, batches, *, label_groups: bool = False) -> float:
    """Per batch: each pair, and its image with the batch's most similar caption that differs and has another
    `.cls` label with `label_groups` (by model.itm_scores and the public encoders: a second computation of what mmscale.eval.fusion
    counts)."""
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
            similarity = (torch.nn.functional.normalize(model.encode_images(images), dim=-1)
                          @ torch.nn.functional.normalize(model.encode_texts(ids, mask), dim=-1).T)
            same = torch.tensor([[torch.equal(a[m.bool()], b[n.bool()]) for b, n in zip(ids, mask)]
                                 for a, m in zip(ids, mask)])
            if label_groups:
                labels = batch["labels"]
                same |= (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
            positives = model.itm_scores(images, ids, mask) > 0.5
            rows = (~same.all(dim=1)).nonzero().squeeze(1)
            negative = similarity.masked_fill(same, float("-inf")).argmax(dim=1)[rows]
            negatives = model.itm_scores(images[rows], ids[negative], mask[negative]) > 0.5
            right += int(positives.sum()) + int((~negatives).sum())
            total += len(positives) + len(rows)
    return right / total


def test_validation_of_a_fusion_model_reports_itm_and_mlm_accuracy(fusion_dir, dual_dir, data, tokenizer):
    from mmscale.eval.embed import evaluate

    model = load_model(fusion_dir).eval()
    batches = list(loader(data["spec"], tokenizer, batch_size=6))
    metrics = evaluate(model, batches, tokenizer=tokenizer, device=model.device, context_length=CONTEXT,
                       batch_size=6)
    assert metrics["itm_accuracy"] == pytest.approx(_expected_itm_accuracy(model, batches), abs=1e-9)
    grouped = evaluate(model, batches, tokenizer=tokenizer, device=model.device, context_length=CONTEXT,
                       batch_size=6, itm_label_groups=True)
    assert grouped["itm_accuracy"] == pytest.approx(_expected_itm_accuracy(model, batches, label_groups=True),
                                                    abs=1e-9)
    assert 0 <= metrics["mlm_accuracy"] <= 1 and "i2t_r1" in metrics
    dual = load_model(dual_dir).eval()
    plain = evaluate(dual, batches, tokenizer=tokenizer, device=dual.device, context_length=CONTEXT, batch_size=6)
    assert "itm_accuracy" not in plain and "mlm_accuracy" not in plain


def _rank_main(rank: int, world: int, folder: str, batches_file: str, shares: list[int], port: int,
               results: str) -> None:
    from mmscale.data.text import load_tokenizer
    from mmscale.eval.embed import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = load_model(folder).eval()
        calls = {}
        for name, module in (("vision", model.towers.vision_model), ("text", model.towers.text_encoder),
                             ("itm", model.towers.itm_head), ("mlm", model.mlm_head)):
            calls[name] = 0
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        batches = torch.load(batches_file)[sum(shares[:rank]):sum(shares[:rank + 1])]
        metrics = evaluate(model, batches, tokenizer=load_tokenizer(folder), device=torch.device("cpu"),
                           context_length=CONTEXT, batch_size=8)
        save_from_every_rank((calls, metrics), results)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_validation_over_unequal_ranks_stays_in_lockstep_and_equals_one_process(fusion_dir, data, tokenizer,
                                                                              tmp_path):
    """Rank 1 has one batch and rank 0 two: rank 1 runs a placeholder batch through the same modules as many times
    as rank 0 runs its second batch (under ZeRO-3 each call is a collective), and the summed counts equal one
    process's on all three batches."""
    from mmscale.eval.embed import evaluate

    batches = [{name: batch[name] for name in ("images", "input_ids", "attention_mask", "labels")}
               for batch in loader(data["spec"], tokenizer)]
    torch.save(batches, tmp_path / "batches.pt")
    mp.spawn(_rank_main, args=(2, str(fusion_dir), str(tmp_path / "batches.pt"), [2, 1], free_port(),
                               str(tmp_path / "results.pt")), nprocs=2, join=True)
    (calls_0, metrics_0), (calls_1, metrics_1) = torch.load(tmp_path / "results.pt")
    assert calls_0 == calls_1 and calls_0["itm"] == 2 and calls_0["mlm"] == 2
    model = load_model(fusion_dir).eval()
    whole = evaluate(model, batches, tokenizer=tokenizer, device=model.device, context_length=CONTEXT, batch_size=8)
    assert metrics_0 == metrics_1
    assert metrics_0 == pytest.approx(whole, rel=1e-6)


@pytest.mark.slow
def test_zero3_training_of_a_fusion_model_validates_on_uneven_ranks(tmp_path):
    """A real 2-rank ZeRO-3 run through DeepSpeed's launcher, 33 validation pairs in batches of 16: rank 0 gets
    batches of 16 and 1, rank 1 one of 16, so rank 1 runs a placeholder batch, gathering parameters for the same
    ITM and MLM calls (a rank short of one would hang the run); the metrics count all 33 pairs."""
    import base64
    import subprocess
    import sys

    from mmscale.shards.synthetic import make_synthetic_shards
    from mmscale.shards.tokenizer_train import iter_captions, train_wordpiece

    make_synthetic_shards(tmp_path / "train", 128, samples_per_shard=64, seed=0)
    make_synthetic_shards(tmp_path / "val", 33, samples_per_shard=24, seed=1)
    train_wordpiece(iter_captions(str(tmp_path / "train")), vocab_size=200, output_dir=tmp_path / "tokenizer")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    overrides = [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                 f"tokenizer={tmp_path / 'tokenizer'}", f"output_dir={tmp_path / 'run'}",
                 f"train.deepspeed={os.path.join(repo, 'configs', 'deepspeed', 'zero3.json')}", "data.workers=1",
                 "train.global_batch_size=32", "train.samples=64", "train.warmup_steps=1", "train.progress=false",
                 "train.tensorboard=false", "model.fusion_layers=4", "loss.itm_weight=1.0", "eval.batch_size=16"]
    result = subprocess.run(
        [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
         f"--master_port={free_port()}", "--module", "mmscale.train", "--config",
         os.path.join(repo, "configs", "pretrain", "tiny.yaml"), *overrides],
        cwd=repo, env=os.environ | {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [record for record in records if record["kind"] == "eval"][-1]
    assert final["samples"] == 33 and 0 <= final["itm_accuracy"] <= 1 and 0 <= final["mlm_accuracy"] <= 1
