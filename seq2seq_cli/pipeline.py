"""`translate run`: tokenizer → prepare → train → decode the test set → score, under recipe.output_dir.

Each stage has a fingerprint: a hash of the recipe sections it reads, the contents of its input
files and the fingerprint of the stage before it. A stage whose fingerprint matches the one
recorded when it last completed (in OUTPUT_DIR/stages.json) is skipped. Training is never
marked complete until it finishes, so an interrupted run resumes from its last checkpoint.
With `train.init_from` there is no tokenizer stage: the parent's tokenizer is the run's (the
training stage writes it into OUTPUT_DIR/tokenizer).

The prepare stage (`prepare.prepare`) encodes the training corpora into shards once; training
reads them. `translate train` prepares them itself when they are missing, and refuses stale ones.

Public names: run_tokenizer, run_prepare, run_train, run_decode_test, run_score_test, run_pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from .atomic import atomic_write
from .checkpoint import RunDir, load_checkpoint
from .data import read_split, sample_pairs
from .memory import release_free_heap
from .prepare import corpus_dir, corpus_specs, prepare
from .recipe import Recipe, RecipeError, Split
from .shards import ShardError, read_manifest
from .tokenizer import SEED, Tokenizer, train_tokenizer

__all__ = ["run_tokenizer", "run_prepare", "run_train", "run_decode_test", "run_score_test", "run_pipeline"]

log = logging.getLogger(__name__)


def _digest(obj: Any, files: list[Optional[Path]]) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for path in files:
        if path is not None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _split_files(split: Optional[Split]) -> list[Optional[Path]]:
    return [] if split is None else [split.src, split.tgt, split.tsv, *split.refs]


def run_tokenizer(recipe: Recipe) -> dict[str, Any]:
    """Train sentencepiece on a bounded sample of the training pairs; report vocab sizes and pieces per sentence.

    The sample is `tokenizer.input_sentence_size` pairs drawn uniformly from all training corpora
    while streaming them (`data.sample_pairs`, seeded): memory does not grow with the corpora.
    """
    if recipe.train.init_from is not None:
        raise RecipeError("train.init_from is set: the run uses the parent's tokenizer, there is none to train")
    src, tgt, counts = sample_pairs(
        recipe.data.training_corpora(), recipe.tokenizer.input_sentence_size, SEED, recipe.data.encoding_errors
    )
    out = RunDir(recipe.output_dir).tokenizer
    tok = train_tokenizer(recipe.tokenizer, src, tgt, out)
    sample_src, sample_tgt = src[:20000], tgt[:20000]
    report = {
        "tokenizer": str(out),
        "joint": tok.joint,
        "src_vocab_size": tok.src_vocab_size,
        "tgt_vocab_size": tok.tgt_vocab_size,
        "src_pieces_per_sentence": round(tok.pieces_per_sentence(sample_src, "src"), 2),
        "tgt_pieces_per_sentence": round(tok.pieces_per_sentence(sample_tgt, "tgt"), 2),
        "pairs_read": counts.read,
        "pairs_sampled": len(src),
        "blank_pairs_skipped": counts.blank,
    }
    log.info("tokenizer: %s", report)
    return report


def run_prepare(recipe: Recipe, workers: int = 0, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Encode the training corpora into shards (those missing or stale; all with force)."""
    return prepare(recipe, workers=workers, progress=progress, force=force)


def run_train(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Train (resuming if possible); trains the tokenizer and prepares the corpora first when they are missing.

    Prepared corpora that exist but are stale are not rebuilt here: training refuses them with a
    one-line error (`translate prepare` or `translate run` rebuilds them).
    """
    from . import distributed as dist
    from .train import train

    run = RunDir(recipe.output_dir)
    ctx = dist.init_from_env()  # under torchrun: join the group so rank 0 can train the tokenizer first
    if ctx.rank == 0 and recipe.train.init_from is None and not _tokenizer_ready(run):
        run_tokenizer(recipe)
    if ctx.world > 1 and ctx.rank == 0 and not _prepared(recipe):  # one process prepares them itself
        prepare(recipe, progress=progress)
    dist.barrier(ctx)
    result = train(recipe, progress=progress)
    return dict(result.__dict__)


def _tokenizer_ready(run: RunDir) -> bool:
    try:
        Tokenizer.load(run.tokenizer)
        return True
    except ValueError:
        return False


def _prepared(recipe: Recipe) -> bool:
    """Whether every training corpus has a manifest (fresh or not: staleness is training's error)."""
    for name, _, _ in corpus_specs(recipe):
        try:
            read_manifest(corpus_dir(recipe, name))
        except ShardError:
            return False
    return True


def best_checkpoint(recipe: Recipe) -> Path:
    """best.pt (best on dev, the checkpoint average included), else last.pt."""
    run = RunDir(recipe.output_dir)
    for p in (run.best, run.last):
        if p.exists():
            return p
    return run.last


def run_decode_test(recipe: Recipe) -> dict[str, Any]:
    """Translate the test source with the best checkpoint into OUTPUT_DIR/test.hyp."""
    from .translate import run_decode

    test = recipe.data.test
    assert test is not None
    out = recipe.output_dir / "test.hyp"
    # decode reads plain text: write out the source side exactly as scored (max_lines, TSV, blanks)
    src = recipe.output_dir / "test.src"
    src.write_text("".join(x + "\n" for x in read_split(test, keep_blank=True).src), encoding="utf-8")
    ckpt = best_checkpoint(recipe)
    # keys the recipe gives explicitly rank above the checkpoint's stored (maybe tuned) settings
    stats = run_decode(
        [ckpt],
        str(src),
        str(out),
        {},
        False,
        recipe.train.device,
        recipe.train.threads,
        recipe.data.encoding_errors,
        recipe=recipe.decode,
    )
    settings = stats.config.model_dump(mode="json") if stats.config is not None else {}
    return {"checkpoint": str(ckpt), "hypotheses": str(out), "lines": stats.lines, "decode": settings}


def run_score_test(recipe: Recipe) -> dict[str, Any]:
    """Score OUTPUT_DIR/test.hyp against the test references; write test.score.json."""
    from .data import read_lines
    from .score import corpus_scores

    test = recipe.data.test
    assert test is not None
    text = read_split(test, recipe.data.encoding_errors, keep_blank=True)
    hyps = read_lines(recipe.output_dir / "test.hyp")
    results = corpus_scores(hyps, [text.tgt, *text.refs])
    report = {r.name: {"score": round(r.score, 2), "signature": r.signature} for r in results}
    atomic_write(recipe.output_dir / "test.score.json", json.dumps(report, indent=1) + "\n")
    for r in results:
        log.info("%s  (%s)", r.text, r.signature)
    return report


def run_pipeline(recipe: Recipe, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the five stages, skipping those whose inputs are unchanged since they completed."""
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    state_file = recipe.output_dir / "stages.json"
    done: dict[str, str] = {} if force or not state_file.exists() else json.loads(state_file.read_text())
    d = recipe.data
    train_files = [f for c in d.training_corpora() for f in _split_files(c)]
    fp_tok = _digest([recipe.tokenizer.model_dump(mode="json"), d.encoding_errors], train_files)
    fp_prep = _digest(
        [
            fp_tok,
            d.model_dump(
                mode="json",
                include={"train", "corpora", "replay", "max_len", "max_len_ratio", "dedup", "encoding_errors"},
            ),
        ],
        _split_files(d.replay),
    )
    fp_train = _digest(
        [
            fp_prep,
            recipe.model.model_dump(mode="json"),
            recipe.train.model_dump(mode="json"),
            recipe.seed,
            d.model_dump(mode="json", exclude={"test"}),
        ],
        _split_files(d.dev) + _split_files(d.replay),
    )

    def fp_prepare() -> str:  # the tokenizer's files count (init_from: the parent's, written by prepare)
        models = sorted(RunDir(recipe.output_dir).tokenizer.glob("*.model"))
        return _digest([fp_prep, str(recipe.train.init_from)], list(models))

    def fp_dec() -> str:  # after training: the model file's content and stored (tuned) settings count too
        ckpt = load_checkpoint(best_checkpoint(recipe), mmap=True)
        return _digest(
            [
                fp_train,
                recipe.decode.model_dump(mode="json"),
                ckpt.sha256,
                ckpt.decode.model_dump(mode="json"),
            ],
            _split_files(d.test)[:1],
        )

    stages: list[tuple[str, Callable[[], str], Callable[[], Any]]] = [
        ("tokenizer", lambda: fp_tok, lambda: run_tokenizer(recipe)),
        ("prepare", fp_prepare, lambda: run_prepare(recipe, progress=progress)),
        ("train", lambda: fp_train, lambda: run_train(recipe, progress)),
    ]
    results: dict[str, Any] = {}
    if recipe.train.init_from is not None:
        stages = stages[1:]
        results["tokenizer"] = "skipped: train.init_from, the parent's tokenizer"
        log.info("stage tokenizer: skipped (train.init_from: the parent's tokenizer is used)")
    if d.test is not None:
        stages += [
            ("decode", fp_dec, lambda: run_decode_test(recipe)),
            ("score", lambda: _digest([done["decode"]], _split_files(d.test)), lambda: run_score_test(recipe)),
        ]
    for name, fingerprint, fn in stages:
        fp = fingerprint()
        if done.get(name) == fp:
            log.info("stage %s: inputs unchanged, skipped", name)
            results[name] = "skipped"
            continue
        log.info("stage %s: running", name)
        results[name] = fn()
        release_free_heap()  # one stage's freed heap is not the next one's peak (memory.py)
        done[name] = fp
        atomic_write(state_file, json.dumps(done, indent=1) + "\n")
    if "score" in results and results["score"] == "skipped":
        results["score"] = json.loads((recipe.output_dir / "test.score.json").read_text())
    return results
