"""`translate tune`, `translate bench` (and its FLOPs accounting), bf16 training/attention on CPU, and
`translate score --baseline --json`.

`translate average` is already covered by tests/test_cli.py (test_average_command_writes_...), so it
is not repeated here. Every test reuses the session's small trained run (`e2e` in conftest.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import sacrebleu
import torch
from typer.testing import CliRunner

from seq2seq_cli.bench import _flops_per_token, bench_part
from seq2seq_cli.checkpoint import load_checkpoint, load_model
from seq2seq_cli.cli import app
from seq2seq_cli.model import MultiHeadAttention, build_model
from seq2seq_cli.recipe import ModelConfig

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    torch.set_num_threads(1)  # commands may change the thread count; keep the shared machine quiet
    return result


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------------ tune


@pytest.fixture(scope="module")
def tuned(e2e, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`translate tune best.pt --beams 1,2 --alphas 0,1 --betas 0.2 --max-sentences 10 -o OUT`, once."""
    out = tmp_path_factory.mktemp("tune") / "tuned.pt"
    before = e2e.best.read_bytes()
    result = _invoke(
        "tune", e2e.best, "--beams", "1,2", "--alphas", "0,1", "--betas", "0.2", "--max-sentences", "10", "-o", out
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert e2e.best.read_bytes() == before, "tune -o must not modify the input checkpoint"
    return {"out": out, "report": json.loads(result.stdout)}


def test_tune_reports_the_staged_grid_and_its_best(tuned) -> None:
    report = tuned["report"]
    assert {"best", "trials"} <= set(report)
    trials = report["trials"]
    # stage 1: every (beam, alpha) with beta 0, in grid order; stage 2: beta 0.2 at the stage-1 winner
    assert [(t["beam"], t["alpha"], t["beta"]) for t in trials[:4]] == [
        (1, 0.0, 0.0),
        (1, 1.0, 0.0),
        (2, 0.0, 0.0),
        (2, 1.0, 0.0),
    ]
    assert len(trials) == 2 * 2 + 1
    stage1 = max(trials[:4], key=lambda t: (t["bleu"], -t["beam"]))
    assert (trials[4]["beam"], trials[4]["alpha"], trials[4]["beta"]) == (stage1["beam"], stage1["alpha"], 0.2)
    assert all(0.0 <= t["bleu"] <= 100.0 for t in trials)
    top = max(t["bleu"] for t in trials)
    assert report["best"]["bleu"] == top
    # ties: the smaller beam, then the earlier grid point
    expected = min((i for i, t in enumerate(trials) if t["bleu"] == top), key=lambda i: (trials[i]["beam"], i))
    assert report["best"] == trials[expected]
    assert report["dev_sentences"] == 10
    assert report["checkpoint"] == str(tuned["out"])


def test_tune_stores_the_best_as_decode_defaults(e2e, tuned) -> None:
    best = tuned["report"]["best"]
    ckpt = load_checkpoint(tuned["out"])
    decode = ckpt.decode
    assert (decode.beam, decode.alpha, decode.beta) == (best["beam"], best["alpha"], best["beta"])
    assert decode.n_best == 1
    original = load_checkpoint(e2e.best)
    for key in ("length_penalty", "max_len_a", "max_len_b", "batch_tokens"):  # the rest is kept
        assert getattr(decode, key) == getattr(original.decode, key), key
    assert ckpt.step == original.step
    for name, value in original.weights.items():
        assert torch.equal(ckpt.weights[name], value), name
    load_model(ckpt)


def test_decoding_the_tuned_checkpoint_uses_the_tuned_settings(e2e, tuned, tmp_path: Path) -> None:
    best = tuned["report"]["best"]
    src = e2e.data["data.test.src"]
    plain, explicit = tmp_path / "plain.hyp", tmp_path / "explicit.hyp"
    r1 = _invoke("decode", tuned["out"], "-i", src, "-o", plain)
    assert r1.exit_code == 0, r1.output
    r2 = _invoke(
        "decode",
        e2e.best,
        "-i",
        src,
        "-o",
        explicit,
        "--beam",
        str(best["beam"]),
        "--alpha",
        str(best["alpha"]),
        "--beta",
        str(best["beta"]),
    )
    assert r2.exit_code == 0, r2.output
    assert _lines(plain) == _lines(explicit)
    assert len(_lines(plain)) == len(_lines(Path(src))) and any(_lines(plain))


def test_tune_in_place_with_src_ref_files(e2e, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    shutil.copyfile(e2e.best, ckpt)
    src, ref = tmp_path / "dev.en", tmp_path / "dev.es"
    src.write_text("".join(x + "\n" for x in _lines(Path(e2e.data["data.dev.src"]))[:6]), encoding="utf-8")
    ref.write_text("".join(x + "\n" for x in _lines(Path(e2e.data["data.dev.tgt"]))[:6]), encoding="utf-8")
    result = _invoke("tune", ckpt, "--beams", "3", "--alphas", "0.3", "--betas", "0", "--src", src, "--ref", ref)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(ckpt) and report["dev_sentences"] == 6
    assert len(report["trials"]) == 1  # beta 0 is the stage-1 value: no second stage
    decode = load_checkpoint(ckpt).decode
    assert (decode.beam, decode.alpha, decode.beta) == (3, 0.3, 0.0)
    load_model(load_checkpoint(ckpt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.en", "dev.es", "model.pt"]  # no temp files left


def test_tune_with_mismatched_src_ref_exits_2_with_one_line(e2e, tmp_path: Path) -> None:
    src, ref, out = tmp_path / "dev.en", tmp_path / "dev.es", tmp_path / "out.pt"
    src.write_text("one two\nthree\nfour\n", encoding="utf-8")
    ref.write_text("uno dos\ntres\n", encoding="utf-8")
    result = _invoke(
        "tune", e2e.best, "--beams", "1", "--alphas", "0", "--betas", "0", "--src", src, "--ref", ref, "-o", out
    )
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert str(src) in message and str(ref) in message and "2" in message and "3" in message
    assert result.stdout == "" and not out.exists()


# ------------------------------------------------------------------------------------ bench


@pytest.mark.slow
def test_bench_json_reports_every_part(e2e) -> None:
    result = _invoke(
        "bench",
        e2e.recipe,
        *e2e.set_args(e2e.run_dir),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--lines",
        "5",
        "--json",
        "--checkpoint",
        e2e.best,
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    r = json.loads(result.stdout)
    assert r["matmul"]["fp32_gflops"] > 0 and r["matmul"]["bf16_gflops"] > 0
    t = r["train"]
    assert t["precision"] == "fp32" and t["steps"] == 2 and t["threads"] == 1
    assert t["tokens_per_s"] > 0 and t["tokens_per_step"] > 0 and t["s_per_step"] > 0
    assert t["tokens_per_step"] == pytest.approx(t["tokens_per_s"] * t["s_per_step"], rel=1e-6)
    lo, hi = sorted((t["flops_per_src_token"], t["flops_per_tgt_token"]))
    assert 0 < lo and lo < t["flops_per_token"] < hi
    assert t["model_gflops"] == pytest.approx(t["tokens_per_s"] * t["flops_per_token"] / 1e9, rel=1e-6)
    assert 0 < t["mfu"] < 1
    assert t["mfu"] == pytest.approx(t["model_gflops"] / r["matmul"]["fp32_gflops"], rel=1e-6)
    # the FLOPs split matches the trained model's shape
    model, _ = load_model(load_checkpoint(e2e.best))
    hand = _flops_per_token(model, 0.5)
    assert (t["flops_per_src_token"], t["flops_per_tgt_token"]) == (
        hand["flops_per_src_token"],
        hand["flops_per_tgt_token"],
    )
    decode = {(d["beam"], d["precision"]): d for d in r["decode"]}
    bf16 = {(5, "bf16-matmul"), (5, "bf16")} if r["machine"]["native_bf16"] else set()
    assert set(decode) == {(1, "fp32"), (5, "fp32"), (5, "int8")} | bf16
    assert len(r["skipped"]) == 2 - len(bf16)
    for d in decode.values():
        assert d["sentences"] == 5 and d["sent_per_s"] > 0 and d["tgt_tokens_per_s"] > 0 and d["target_tokens"] >= 5
        assert 0 <= d["bleu"] <= 100 and 0 <= d["chrf"] <= 100  # scored against the first 5 references
    assert r["startup_s"] > 0
    m = r["machine"]
    assert m["cpus"] >= 1 and m["cpu"] and m["auto_decode"] == ("bf16-matmul" if m["native_bf16"] else "fp32")
    assert m["auto_train"] == ("bf16" if m["native_bf16"] else "fp32")
    assert m["description"].startswith(m["cpu"])


def _hand_params(cfg: ModelConfig, vocab: int) -> tuple[int, int]:
    """(encoder, decoder + softmax) parameter counts, from the architecture, not from the module."""
    d, ff = cfg.d_model, cfg.ff_dim
    attn = (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)  # q, kv, out projections with biases
    ffn = (d * ff + ff) + (ff * d + d)
    ln = 2 * d
    final = ln if cfg.norm == "pre" else 0
    enc = cfg.n_encoder_layers * (attn + ffn + 2 * ln) + final
    dec = cfg.n_decoder_layers * (2 * attn + ffn + 3 * ln) + final
    return enc, dec + vocab * d


@pytest.mark.parametrize("norm,tie", [("post", True), ("pre", True), ("pre", False)])
def test_flops_per_token_is_six_times_the_parameters_touched(norm: str, tie: bool) -> None:
    cfg = ModelConfig(
        d_model=16,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=3,
        ff_dim=24,
        norm=norm,
        tie_output=tie,
        share_embeddings=False,
        max_positions=32,
    )
    vocab = 50
    model = build_model(cfg, 40, vocab, 0, 2, 3)
    enc, tgt = _hand_params(cfg, vocab)
    flops = _flops_per_token(model, 0.25)
    assert flops["flops_per_src_token"] == 6 * enc
    assert flops["flops_per_tgt_token"] == 6 * tgt
    assert flops["flops_per_token"] == pytest.approx(0.25 * 6 * enc + 0.75 * 6 * tgt)


def test_bench_train_runs_the_real_loop_across_epochs(e2e, tmp_path: Path) -> None:
    # 12 short training pairs and a large token budget: one epoch is a single update, and the real
    # training loop goes on into the next epochs, as `translate train` would
    overrides = e2e.overrides(e2e.run_dir, data__train__max_lines=12, train__batch_tokens=4096)
    one = bench_part("train", [str(e2e.recipe), json.dumps(overrides), "0", "1"])
    three = bench_part("train", [str(e2e.recipe), json.dumps(overrides), "1", "3"])
    torch.set_num_threads(1)
    assert (one["steps"], three["steps"]) == (1, 3)  # the warm-up update is not counted
    assert three["tokens_per_step"] == pytest.approx(one["tokens_per_step"])  # the same 12 pairs each update
    assert three["windows"] == 3 and three["precision"] == three["precision_asked"] == "fp32"


# ------------------------------------------------------------------------------------ bf16


def test_bf16_training_runs_with_finite_losses(e2e, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    e2e.copy_tokenizer(out)
    result = _invoke(
        "train",
        e2e.recipe,
        *e2e.set_args(
            out, train__precision="bf16", train__max_steps=3, train__log_every=1, train__valid_max_sentences=5
        ),
        "--no-progress",
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    records = [json.loads(x) for x in _lines(out / "metrics.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    valid = [r for r in records if r["type"] == "valid"]
    assert valid and math.isfinite(valid[-1]["dev_nll"])
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt.recipe.train.precision == "bf16" and ckpt.step == 3
    assert all(
        v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt.weights.values() if v.is_floating_point()
    )  # master weights stay fp32


def test_bf16_first_update_loss_matches_fp32(e2e, tmp_path: Path) -> None:
    from seq2seq_cli.train import Trainer

    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        e2e.copy_tokenizer(out)
        trainer = Trainer(e2e.load(out, train__precision=precision), progress=False)
        loss, _, n_tgt, _ = trainer._update(trainer._epoch_groups()[0])
        losses[precision] = loss / n_tgt
    torch.set_num_threads(1)
    assert math.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


@pytest.mark.parametrize("mode", ["cross", "cross_weights", "causal_self"])
def test_attention_under_bf16_autocast_is_close_to_fp32(mode: str) -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    memory = torch.randn(2, 7, 32)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    causal = mode == "causal_self"

    def run():
        kv_in = x if causal else memory
        k, v = attn.keys_values(kv_in)
        return attn.attend(x, k, v, mask=None if causal else mask, causal=causal, need_weights=mode == "cross_weights")

    with torch.no_grad():
        ref, ref_w = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, low_w = run()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=0)
    assert ref.abs().max() > 0.1  # not trivially close
    if mode == "cross_weights":
        torch.testing.assert_close(low_w.float(), ref_w, atol=3e-2, rtol=0)
        assert torch.all(low_w[1, :, 4:] == 0)


# ------------------------------------------------------------------------------------ score --baseline --json


def test_score_baseline_json_has_paired_bootstrap(tmp_path: Path) -> None:
    hyps = ["the cat sat on the mat", "a dog barked at the moon", "it is raining today", "he reads a good book"]
    refs = ["the cat sat on a mat", "the dog barked at the moon", "it rains today", "he is reading a book"]
    base = ["cat mat", "dog moon", "rain", "book"]
    files = {}
    for name, lines in (("hyp", hyps), ("ref", refs), ("base", base)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    result = _invoke(
        "score", files["hyp"], files["ref"], "--metrics", "bleu,chrf", "--baseline", files["base"], "--json"
    )
    assert result.exit_code == 0, result.output
    tests = json.loads(result.stdout)["paired_bootstrap"]
    assert [t["metric"] for t in tests] == ["BLEU", "chrF2"]
    for t in tests:
        assert 0.0 <= t["p_value"] <= 1.0 and t["significant"] == (t["p_value"] < 0.05)
        assert t["system"] > t["baseline"]
    assert tests[0]["system"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    same = _invoke("score", files["hyp"], files["ref"], "--metrics", "bleu", "--baseline", files["hyp"], "--json")
    assert json.loads(same.stdout)["paired_bootstrap"][0]["p_value"] == 1.0


@pytest.mark.slow
def test_tuned_value_survives_run_and_yields_to_explicit_keys_and_flags(e2e, tmp_path: Path) -> None:
    """Precedence: command line > recipe keys given explicitly > the checkpoint's tuned values > defaults.

    tiny.yaml's decode section gives beam, alpha and max_len_b but not beta; a value stored in best.pt
    (as `translate tune` stores its winner) is used by `translate run`'s decode stage, which
    reruns because the model file's settings changed; a recipe key or a flag overrides it.
    """
    from dataclasses import replace

    from seq2seq_cli.checkpoint import save_checkpoint
    from seq2seq_cli.translate import Translator

    run = tmp_path / "run"
    shutil.copytree(e2e.run_dir, run)
    best = run / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(best)
    tuned_settings = {"beta": 0.4, "max_len_a": 0.0, "max_len_b": 2, "beam": 4}  # at most 2 target pieces
    save_checkpoint(best, replace(ckpt, decode=ckpt.decode.model_copy(update=tuned_settings)))

    def run_decode_settings(*extra: str) -> dict:
        result = _invoke("run", e2e.recipe, *e2e.set_args(run), *extra, "--no-progress")
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        report = json.loads(result.stdout)
        assert report["tokenizer"] == report["train"] == "skipped"
        return report["decode"]["decode"]

    tuned = run_decode_settings()
    assert tuned["beta"] == 0.4  # the stored (tuned) value survives translate run
    assert (tuned["beam"], tuned["max_len_b"]) == (2, 10)  # the recipe's explicit keys win over stored ones
    assert run_decode_settings("--set", "decode.beta=0.1")["beta"] == 0.1

    src = Path(e2e.data["data.test.src"])
    plain, flagged = tmp_path / "plain.hyp", tmp_path / "flagged.hyp"
    assert _invoke("decode", best, "-i", src, "-o", plain).exit_code == 0
    assert _invoke("decode", best, "-i", src, "-o", flagged, "--max-len-b", "30").exit_code == 0
    for path, options, max_len_b in ((plain, {}, 2), (flagged, {"max_len_b": 30}, 30)):
        tr = Translator([best], "cpu", 1, options)
        assert (tr.config.max_len_b, tr.config.beam, tr.config.beta) == (max_len_b, 4, 0.4)
        expected = [tr.detok(h[0]) if h else "" for h in tr.translate_window(_lines(src))]
        assert _lines(path) == expected
    # the stored max_len 2 cuts translations short, the flag lifts it: both settings really counted
    assert _lines(plain) != _lines(flagged) and max(len(x.split()) for x in _lines(plain)) <= 2
