"""The training loop: batches → label-smoothed loss → Adam with warm-up → validation → checkpoints.

One update = `accum_steps` micro-batches per rank. The loss of the update is the sum over all
its target tokens (all micro-batches, all ranks) divided by that total, so the gradient does
not depend on how the tokens are split between micro-batches or processes. Under torchrun
(WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel, ranks take disjoint shards
of each epoch's batches, and only rank 0 validates, logs and writes files.

Training pairs come from the corpora prepared under OUTPUT_DIR/prepared/ (`prepare`, `shards`):
only their lengths are in memory, each batch's rows are read from disk, and each epoch's batches
are built with numpy from the lengths and the corpus weights.

A run resumes from `checkpoints/last.pt`: weights, optimizer, schedule, RNG states and the
position in the epoch's batch order are restored, so the continued run sees the same batches.

Fine-tuning (`train.init_from: PARENT.pt`, while the run has no last.pt yet): the model shape and
the tokenizer are the parent's (`finetune_recipe`), its weights are loaded before the first update,
and the optimizer, schedule and step counter start fresh; the parent's tokenizer is written into
OUTPUT_DIR/tokenizer and goes into every checkpoint, so once last.pt exists the run resumes from it
like any other. `train.freeze` keeps parameter groups fixed; `data.replay` mixes pairs of another
corpus into the training data.
SIGINT/SIGTERM save a checkpoint first and then raise `TrainingInterrupted`.

This room does not parse CLI options. Public names: train, TrainResult, TrainingInterrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import distributed as dist
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    RunDir,
    TrainingState,
    average_checkpoints,
    link_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
)
from .data import (
    DataError,
    EncodedCorpus,
    ParallelText,
    collate,
    collate_rows,
    encode_pairs,
    make_batches,
    read_split,
    shard_batches,
)
from .loss import label_smoothed_nll, output_layer_loss
from .memory import bound_kernel_caches, peak_rss_mib, release_free_heap
from .model import Seq2SeqTransformer, build_model
from .precision import resolve_precision
from .prepare import open_training_set
from .recipe import Recipe, RecipeError
from .schedule import make_scheduler
from .score import dev_scores
from .search import translate_ids
from .shards import TrainingSet
from .tokenizer import Tokenizer

__all__ = ["train", "TrainResult", "TrainingInterrupted", "finetune_recipe", "freeze"]

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised after a signal stopped training and the checkpoint was saved."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}; checkpoint saved, run the same command to resume")
        self.exit_code = 128 + signum


@dataclass
class TrainResult:
    step: int
    epoch: int
    stop_reason: str
    best_score: Optional[float]
    last_path: str
    best_path: Optional[str]
    coverage: Optional[dict[str, float]] = None  # init_from: the parent tokenizer on the new training text
    replay: Optional[dict[str, float]] = None  # data.replay: how many pairs were mixed in


@dataclass
class _Position:
    """Where training is: updates done, epoch, batches of this epoch consumed (all ranks)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    seconds: float = 0.0
    best_score: Optional[float] = None
    bad_validations: int = 0


@dataclass
class Corpora:
    """The prepared training corpora (token-id shards on disk, see `prepare`) and the dev set, if any."""

    train: TrainingSet
    report: dict[str, Any]
    dev_text: Optional[ParallelText] = None
    dev: Optional[EncodedCorpus] = None
    coverage: Optional[dict[str, float]] = None
    replay: Optional[dict[str, float]] = None


def coverage_report(counts: dict[str, dict[str, int]], sentences: int) -> dict[str, float]:
    """Unknown-piece rate (UNK pieces / all pieces) and pieces per sentence on each side, from prepare's counts."""
    out: dict[str, float] = {}
    for side in ("src", "tgt"):
        pieces, unk = counts[side]["pieces"], counts[side]["unk"]
        out[f"{side}_unk_rate"] = round(unk / max(1, pieces), 6)
        out[f"{side}_pieces_per_sentence"] = round(pieces / max(1, sentences), 2)
    return out


def load_corpora(recipe: Recipe, tok: Tokenizer, report: bool, prepare_missing: bool = True) -> Corpora:
    """Open the prepared training corpora (checked fresh and whole; prepared first if they never
    were and prepare_missing); read the dev split (long lines truncated)."""
    d = recipe.data
    train, info = open_training_set(recipe, tok, prepare_missing=prepare_missing)
    if report:
        for name, c in info["counts"].items():
            log.info(
                "corpus %s: %d pairs kept of %d, %d blank skipped, %d longer than %d dropped, %d dropped by ratio, "
                "%d duplicates; %d per epoch",
                name,
                c["kept"],
                c["read"],
                c["blank"],
                c["too_long"],
                d.max_len,
                c["ratio"],
                c["duplicates"],
                info["corpora"][name]["per_epoch"],
            )
    coverage = None
    if recipe.train.init_from is not None:
        first = next(iter(info["counts"].values()))
        coverage = coverage_report(info["coverage_counts"], first["sentences"])
        if report:
            log.info("parent tokenizer on the new training text: %s", coverage)
    replay = info.get("replay")
    if replay is not None and report:
        log.info(
            "replay: %d of %d pairs of %s mixed into %d in-domain pairs per epoch (%.1f%% of training pairs)",
            replay["replay_pairs"],
            replay["replay_pool"],
            d.replay.src or d.replay.tsv,  # type: ignore[union-attr]
            replay["in_domain_pairs"],
            100 * replay["replay_fraction"],
        )
    corpora = Corpora(train, info, coverage=coverage, replay=replay)
    if d.dev is not None:
        corpora.dev_text = read_split(d.dev, d.encoding_errors)
        corpora.dev = encode_pairs(corpora.dev_text, tok, recipe.model.max_positions, filter_long=False, truncate=True)
    return corpora


_DROPOUTS = {"dropout", "attention_dropout", "activation_dropout"}


def finetune_recipe(recipe: Recipe, parent: Checkpoint) -> Recipe:
    """The recipe with the parent checkpoint's model and tokenizer sections (train.init_from).

    The model shape and the tokenizer are the parent's. Keys of these sections that the recipe
    gives explicitly (in the YAML or with --set: pydantic's `model_fields_set`) must equal the
    parent's, except the three dropout rates, which a fine-tuning run may change; any other
    difference is a one-line RecipeError naming the key.
    """
    sections = {}
    for name in ("model", "tokenizer"):
        mine, theirs = getattr(recipe, name), getattr(parent.recipe, name)
        free = _DROPOUTS if name == "model" else set()
        for key in sorted(mine.model_fields_set - free):
            if getattr(mine, key) != getattr(theirs, key):
                raise RecipeError(
                    f"train.init_from: parent has {name}.{key} {getattr(theirs, key)!r}, "
                    f"this recipe says {getattr(mine, key)!r} ({parent.where()})"
                )
        sections[name] = theirs.model_copy(update={k: getattr(mine, k) for k in mine.model_fields_set & free})
    if recipe.data.max_len > sections["model"].max_positions:
        raise RecipeError(
            f"train.init_from: data.max_len ({recipe.data.max_len}) must not exceed the parent's "
            f"model.max_positions ({sections['model'].max_positions})"
        )
    return recipe.model_copy(update=sections)


def _init_source(recipe: Recipe, run: RunDir) -> tuple[Recipe, Optional[Checkpoint], Tokenizer]:
    """For train.init_from: (the fine-tuning recipe, the parent to load weights from, its tokenizer).

    While the run has no last.pt the parent file is read; afterwards last.pt (which holds the same
    model shape and tokenizer) is, and the parent (None) is not needed again.
    """
    assert recipe.train.init_from is not None
    resuming = run.last.exists()
    try:
        source = load_checkpoint(run.last if resuming else recipe.train.init_from, mmap=True)
    except CheckpointError as exc:
        raise CheckpointError(str(exc) if resuming else f"train.init_from: {exc}") from None
    try:
        tok = Tokenizer.from_state(dict(source.tokenizer))
    except Exception as exc:  # sentencepiece raises bare RuntimeErrors on bad protos
        raise CheckpointError(f"train.init_from: {source.where()}: stored tokenizer is unreadable ({exc})") from None
    return finetune_recipe(recipe, source), None if resuming else source, tok


def freeze(model: Seq2SeqTransformer, groups: list[str]) -> int:
    """Set requires_grad False on the parameter groups named (embeddings, encoder, decoder); return
    how many parameters (elements) that froze.

    embeddings = source/target embeddings and learned positions; with tied output (the default) the
    output layer *is* the target embedding, so it freezes with the embeddings. encoder/decoder = their
    layers and final norm; an untied output layer belongs to the decoder.
    """
    modules: dict[str, list[Optional[torch.nn.Module]]] = {
        "embeddings": [model.src_embed, model.tgt_embed, model.pos_embed],
        "encoder": [model.encoder, model.enc_norm],
        "decoder": [model.decoder, model.dec_norm, None if model.cfg.tie_output else model.output],
    }
    frozen: dict[int, torch.nn.Parameter] = {}
    for group in groups:
        for module in modules[group]:
            for p in module.parameters() if module is not None else ():
                frozen[id(p)] = p
    for p in frozen.values():
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen.values())


class Validator:
    """Dev loss and perplexity (teacher forced) and BLEU / chrF of real decodes of the dev set.

    Decodes with the recipe's decode settings, beam `train.valid_beam`, 1-best, on at most
    `train.valid_max_sentences` lines, through the search room's batched entry point.
    """

    def __init__(
        self,
        recipe: Recipe,
        tok: Tokenizer,
        text: ParallelText,
        dev: EncodedCorpus,
        device: torch.device,
        autocast: Any,
    ) -> None:
        self.recipe, self.tok, self.text, self.dev, self.device, self.autocast = (
            recipe,
            tok,
            text,
            dev,
            device,
            autocast,
        )
        self.opts = recipe.decode.model_copy(update={"beam": recipe.train.valid_beam, "n_best": 1, "sample": False})

    def dev_nll(self, model: Seq2SeqTransformer) -> float:
        """Mean negative log-likelihood per target token (EOS included), no label smoothing."""
        tok, nll_sum, n_tok = self.tok, 0.0, 0
        lens = [len(s) for s in self.dev.src]
        for idx in make_batches(lens, [len(t) for t in self.dev.tgt], self.recipe.train.batch_tokens, 0, 0):
            b = collate(self.dev, idx, tok.pad_id, tok.bos_id, tok.eos_id).to(self.device)
            keep = b.tgt_out.ne(tok.pad_id)
            with self.autocast():
                logits = model(b.src, b.tgt_in, keep)
            _, nll, n = label_smoothed_nll(logits, b.tgt_out[keep], 0.0, tok.pad_id)
            nll_sum, n_tok = nll_sum + float(nll), n_tok + n
        return nll_sum / max(1, n_tok)

    def __call__(self, model: Seq2SeqTransformer) -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            dev_loss = self.dev_nll(model)
        limit = self.recipe.train.valid_max_sentences or len(self.dev)
        hyps = translate_ids(
            model, self.dev.src[:limit], self.opts, self.device, self.tok.pad_id, context=self.autocast
        )
        system = [self.tok.decode_tgt(h[0].tokens) if h else "" for h in hyps]
        return {
            "dev_nll": dev_loss,
            "dev_ppl": math.exp(min(dev_loss, 50.0)),
            **dev_scores(system, self.text.tgt[:limit]),
        }


@dataclass
class _Window:
    """Sums over the updates since the last training log line."""

    loss: float = 0.0
    nll: float = 0.0
    tgt: int = 0
    src: int = 0
    updates: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, nll: float, tgt: int, src: int) -> None:
        self.loss, self.nll, self.tgt, self.src = self.loss + loss, self.nll + nll, self.tgt + tgt, self.src + src
        self.updates += 1

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class Trainer:
    """Holds the model, optimizer and data of one run; `run()` trains until a budget ends."""

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe, self.cfg = recipe, recipe.train
        bound_kernel_caches(training=True)  # kernels per batch shape would fill memory (memory.py)
        self.ctx = dist.init_from_env()
        self.main = self.ctx.rank == 0
        self.device = dist.pick_device(self.cfg.device, self.ctx.local_rank)
        threads = self.cfg.threads or max(1, (os.cpu_count() or 1) // self.ctx.local_world)
        torch.set_num_threads(threads)
        self.run_dir = RunDir(recipe.output_dir)
        self.progress = progress and self.main
        parent: Optional[Checkpoint] = None
        if recipe.train.init_from is not None:
            recipe, parent, self.tok = _init_source(recipe, self.run_dir)
            self.recipe = recipe
            if self.main:
                self.tok.save(self.run_dir.tokenizer)
        else:
            self.tok = Tokenizer.load(self.run_dir.tokenizer)
        self.data = load_corpora(recipe, self.tok, self.main, prepare_missing=self.ctx.world == 1)
        torch.manual_seed(recipe.seed)
        random.seed(recipe.seed)
        self.model: Seq2SeqTransformer = build_model(
            recipe.model,
            self.tok.src_vocab_size,
            self.tok.tgt_vocab_size,
            self.tok.pad_id,
            self.tok.bos_id,
            self.tok.eos_id,
        ).to(self.device)
        if parent is not None:
            try:
                self.model.load_state_dict(dict(parent.weights))
            except RuntimeError:
                raise CheckpointError(
                    f"train.init_from: {parent.where()}: weights do not fit its stored model shape and tokenizer"
                ) from None
            if self.main:
                log.info(
                    "fine-tuning from %s (step %d): fresh optimizer, schedule and step counter",
                    parent.where(),
                    parent.step,
                )
        if self.cfg.freeze:
            n = freeze(self.model, list(self.cfg.freeze))
            if self.main:
                log.info("frozen: %s (%d parameters)", ", ".join(self.cfg.freeze), n)
        opt_cls = torch.optim.AdamW if self.cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(
            self.model.parameters(), lr=1.0, betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay
        )
        self.pos = _Position()
        self.scheduler = make_scheduler(self.optimizer, self.cfg, recipe.model.d_model, lambda: self.pos.seconds)
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else (0, 0)
        self.precision = resolve_precision(self.cfg.precision, self.device.type, "train", capability)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16" and self.device.type == "cuda")
        self._resume()
        self.ddp = dist.wrap(self.model, self.ctx, self.device)
        self.stop_signal: Optional[int] = None
        self._abortable = False
        self._rng_before_update = _rng_state(self.device)
        if self.ctx.world == 1:
            _interruptible_backward(self.model)
        self.saved_step = self.pos.step if self.run_dir.last.exists() else -1
        if self.main and (parent is not None or not self.run_dir.last.exists()):
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            self.log_record(
                {
                    "type": "data",
                    "step": 0,
                    "corpora": self.data.report["corpora"],
                    "counts": self.data.report["counts"],
                    "init_from": None if parent is None else str(parent.where()),
                    "coverage": self.data.coverage,
                    "replay": self.data.replay,
                }
            )
        self.validate: Optional[Validator] = None
        if self.data.dev is not None and self.data.dev_text is not None:
            self.validate = Validator(recipe, self.tok, self.data.dev_text, self.data.dev, self.device, self._autocast)

    # ------------------------------------------------------------------------------ setup
    def _resume(self) -> None:
        """Restore weights, optimizer, schedule, RNG states and the position from last.pt."""
        if not self.run_dir.last.exists():
            return
        ckpt = load_checkpoint(self.run_dir.last)
        t = ckpt.training
        if t is None:
            raise CheckpointError(f"{ckpt.path}: has no optimizer state; cannot resume from it")
        try:
            self.model.load_state_dict(dict(ckpt.weights))
        except RuntimeError:
            raise CheckpointError(
                f"{ckpt.path}: was trained with another model shape or tokenizer; use a new "
                "output_dir or remove its checkpoints"
            ) from None
        self.optimizer.load_state_dict(t.optimizer)
        self.scheduler.load_state_dict(t.scheduler)
        if t.scaler:
            self.scaler.load_state_dict(t.scaler)
        self.pos = _Position(**t.position)
        _set_rng_state(t.rng, self.device)
        if self.main:
            log.info("resuming from %s at step %d (epoch %d)", ckpt.path, self.pos.step, self.pos.epoch + 1)

    # ------------------------------------------------------------------------------ one update
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _update(self, group: list[list[int]]) -> tuple[float, float, int, int]:
        """One optimizer update over micro-batches `group`; returns (loss_sum, nll_sum, n_tgt, n_src).

        The forward and backward passes may be abandoned by a signal (`_StepAborted`, single
        process only): nothing has changed the weights, the optimizer or the schedule yet. The
        optimizer step that follows is never interrupted.
        """
        self._rng_before_update = _rng_state(self.device)
        self._abortable = self.ctx.world == 1
        try:
            stats = self._gradients(group)
        finally:
            self._abortable = False
        self._apply_gradients()
        return stats

    def _gradients(self, group: list[list[int]]) -> tuple[float, float, int, int]:
        """Forward and backward over the micro-batches; gradients accumulate in the parameters."""
        tok = self.tok
        pad = (tok.pad_id, tok.bos_id, tok.eos_id, self.cfg.pad_multiple)
        micro = [collate_rows(*self.data.train.rows(idx), *pad) for idx in group]
        local_tgt = sum(b.n_tgt for b in micro)
        total_tgt = dist.all_reduce_sum(local_tgt, self.ctx, self.device)
        scale = self.ctx.world / total_tgt  # DDP averages gradients over ranks: undo it, divide by all tokens
        loss_sum = nll_sum = 0.0
        self.model.train()
        for i, b in enumerate(micro):
            b = b.to(self.device, non_blocking=True)
            sync = i == len(micro) - 1
            with dist.maybe_no_sync(self.ddp, sync), self._autocast():
                keep = b.tgt_out.ne(tok.pad_id)
                hidden = self.ddp(b.src, b.tgt_in, keep, project=False)  # (K, D): the loss applies the output layer
                loss, nll, _ = output_layer_loss(
                    hidden, self.model.output.weight, b.tgt_out[keep], self.cfg.label_smoothing
                )
            self.scaler.scale(loss * scale).backward()
            loss_sum, nll_sum = loss_sum + float(loss.detach()), nll_sum + float(nll.detach())
        return loss_sum, nll_sum, local_tgt, sum(b.n_src for b in micro)

    def _apply_gradients(self) -> None:
        """Clip, step the optimizer and the schedule, clear the gradients."""
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------ validation
    def _is_better(self, score: float) -> bool:
        best = self.pos.best_score
        if best is None:
            return True
        return score < best if self.cfg.best_metric == "loss" else score > best

    # ------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> Checkpoint:
        rng = _rng_state(self.device)
        training = TrainingState(
            dict(self.pos.__dict__),
            self.optimizer.state_dict(),
            self.scheduler.state_dict(),
            rng,
            self.scaler.state_dict() or None,
        )
        return Checkpoint(
            self.recipe, self.model.state_dict(), self.tok.to_state(), self.recipe.decode, self.pos.step, training
        )

    def save(self, best: bool = False) -> None:
        """Write step-N.pt, point last.pt (and best.pt) at it, keep the newest keep_last files."""
        self.saved_step = self.pos.step  # every rank tracks it, so all agree on the final save in _finish
        if not self.main:
            return
        path = self.run_dir.step_file(self.pos.step)
        save_checkpoint(path, self._checkpoint())
        link_checkpoint(path, self.run_dir.last)
        if best:
            link_checkpoint(path, self.run_dir.best)
        prune_checkpoints(self.run_dir.checkpoints, self.cfg.keep_last)

    def log_record(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.run_dir.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------ the loop
    def _budget_left(self) -> Optional[str]:
        c, p = self.cfg, self.pos
        if c.max_steps and p.step >= c.max_steps:
            return "max_steps"
        if c.max_epochs and p.epoch >= c.max_epochs:
            return "max_epochs"
        if c.max_time and p.seconds >= c.max_time * 60:
            return "max_time"
        return None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """First SIGINT/SIGTERM: stop at once if inside a forward/backward pass (that step is dropped),
        else after the current step; save; exit 130/143. A second one exits immediately: the
        checkpoints on disk are complete files (atomic writes), the last good one stays."""
        if self.stop_signal is not None:
            sys.stderr.write(
                f"second signal {signum}: exiting now; checkpoints/last.pt is the last complete checkpoint\n"
            )
            sys.stderr.flush()
            os._exit(128 + signum)
        self.stop_signal = signum
        if self._abortable:
            self._abortable = False
            raise _StepAborted()

    def run(self) -> TrainResult:
        from .progress import TrainProgress  # rich is only needed when training

        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        old = (
            {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _in_main_thread() else {}
        )
        try:
            with TrainProgress(self.cfg, enabled=self.progress, lines=self.main) as bar:
                reason = self._loop(bar)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self._finish(reason)

    def _epoch_groups(self) -> list[list[list[int]]]:
        train, seed, epoch = self.data.train, self.recipe.seed, self.pos.epoch
        ids = train.epoch_ids(seed, epoch)
        batches = make_batches(train.src_lens, train.tgt_lens, self.cfg.batch_tokens, seed, epoch, ids)
        acc, world = self.cfg.accum_steps, self.ctx.world
        mine = shard_batches(batches, self.ctx.rank, world, acc)
        if not mine:
            raise DataError(f"{len(batches)} batches per epoch cannot feed {world} ranks x {acc} accumulation steps")
        return [mine[i : i + acc] for i in range(0, len(mine), acc)]

    def _loop(self, bar) -> str:
        """Update until a budget ends: update, log, validate, clock, signal, budget — per step."""
        window = _Window()
        release_free_heap()  # what loading and preparing the data freed (0.7 GB on the bible recipe)
        self._tick = time.perf_counter()
        while (reason := self._budget_left()) is None:
            for group in self._remaining_groups():
                try:
                    window.add(*self._update(group))
                except _StepAborted:  # Ctrl-C in a long step: drop it, save the last completed one
                    self.optimizer.zero_grad(set_to_none=True)
                    _set_rng_state(self._rng_before_update, self.device)
                    self._stop_if_signalled()
                self.pos.step += 1
                self.pos.batches_done += self.ctx.world * self.cfg.accum_steps
                self._advance_clock()  # before logging, so a record's minutes include its own step
                if self.pos.step % self.cfg.log_every == 0:
                    self._log_train(window, bar)
                    release_free_heap()  # the heap fragments as batch shapes change (see memory.py)
                if self.validate is not None and self.pos.step % self.cfg.valid_every == 0:
                    if self._validate_and_save():
                        return "early_stopping"
                    release_free_heap()  # decoding's blocks would otherwise sit under the next updates
                bar.update(self.pos)
                self._stop_if_signalled()
                if (reason := self._budget_left()) is not None:
                    return reason
            self.pos.epoch += 1
            self.pos.batches_done = 0
        return reason

    def _remaining_groups(self) -> list[list[list[int]]]:
        """This epoch's update groups not yet done (a resumed run skips those it already trained on)."""
        return self._epoch_groups()[self.pos.batches_done // (self.ctx.world * self.cfg.accum_steps) :]

    def _advance_clock(self) -> None:
        """Add the wall time since the last tick (a validation counts in the step after it), agreed across ranks."""
        now = time.perf_counter()
        self.pos.seconds += dist.max_across(now - self._tick, self.ctx, self.device)
        self._tick = now

    def _stop_if_signalled(self) -> None:
        if self.stop_signal is not None:
            self.save()
            raise TrainingInterrupted(self.stop_signal)

    def _log_train(self, w: "_Window", bar) -> None:
        loss, nll, tgt, src = dist.all_reduce_list([w.loss, w.nll, w.tgt, w.src], self.ctx, self.device)
        elapsed = time.perf_counter() - w.start
        rec = {
            "type": "train",
            "step": self.pos.step,
            "epoch": self.pos.epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": loss / max(tgt, 1),
            "nll": nll / max(tgt, 1),
            "ppl": math.exp(min(nll / max(tgt, 1), 50.0)),
            "tokens_per_s": (tgt + src) / max(elapsed, 1e-9),
            "tgt_tokens": int(tgt),
            "src_tokens": int(src),
            "seconds": elapsed,
            "updates": w.updates,
            "minutes": self.pos.seconds / 60,
            "peak_rss_mib": peak_rss_mib(),  # this process's (this rank's) high-water mark so far
        }
        self.log_record(rec)
        bar.train_record(rec)
        w.reset()

    def _validate_and_save(self) -> bool:
        """Validate on rank 0, save, and agree on early stopping across ranks. True = stop."""
        stop = False
        if self.main:
            metrics = self.validate(self.model)  # type: ignore[misc]
            score = metrics["dev_nll"] if self.cfg.best_metric == "loss" else metrics[self.cfg.best_metric]
            better = self._is_better(score)
            if better:
                self.pos.best_score, self.pos.bad_validations = score, 0
            else:
                self.pos.bad_validations += 1
            rec = {"type": "valid", "step": self.pos.step, "minutes": self.pos.seconds / 60, **metrics, "best": better}
            self.log_record(rec)
            log.info(
                "validation at step %d: %s",
                self.pos.step,
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in rec.items()
                    if k not in ("type", "step")
                ),
            )
            self.save(best=better)
            stop = bool(self.cfg.patience and self.pos.bad_validations >= self.cfg.patience)
        self.saved_step = self.pos.step
        return dist.broadcast_flag(stop, self.ctx, self.device)

    def _average(self) -> None:
        """Average the last N step checkpoints into average.pt; if it validates better than the
        best checkpoint on dev, it becomes best.pt (the choice is made on dev, never on test)."""
        paths = step_checkpoints(self.run_dir.checkpoints)[-self.cfg.average_last :]
        averaged = average_checkpoints(paths)
        save_checkpoint(self.run_dir.average, averaged)
        if self.validate is None or len(paths) < 2:
            return
        trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(dict(averaged.weights))
        metrics = self.validate(self.model)  # type: ignore[misc]
        self.model.load_state_dict(trained)
        score = metrics["dev_nll"] if self.cfg.best_metric == "loss" else metrics[self.cfg.best_metric]
        better = self._is_better(score)
        self.log_record({"type": "average", "step": self.pos.step, "averaged": len(paths), **metrics, "best": better})
        log.info(
            "average of %d checkpoints: %s=%.4g (%s than best)",
            len(paths),
            self.cfg.best_metric,
            score,
            "better" if better else "not better",
        )
        if better:
            self.pos.best_score = score
            link_checkpoint(self.run_dir.average, self.run_dir.best)

    def _finish(self, reason: str) -> TrainResult:
        if self.pos.step and self.saved_step != self.pos.step:
            if self.validate is not None and reason != "early_stopping":
                self._validate_and_save()
            else:
                self.save(best=self.validate is None)
        if self.main and self.cfg.average_last > 1:
            self._average()
        best = self.run_dir.best if self.run_dir.best.exists() else None
        dist.barrier(self.ctx)
        return TrainResult(
            self.pos.step,
            self.pos.epoch,
            reason,
            self.pos.best_score,
            str(self.run_dir.last),
            str(best) if best else None,
            self.data.coverage,
            self.data.replay,
        )


class _StepAborted(Exception):
    """Raised by the signal handler inside a forward/backward pass to abandon that step."""


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], device)


def _interruptible_backward(model: torch.nn.Module) -> None:
    """Give signal handlers a chance to run during backward passes.

    On the CPU the autograd engine runs a backward pass in the calling thread without returning to
    Python, so a Ctrl-C would wait for the whole pass (over a minute per step where bf16 is
    emulated). A no-op gradient hook on each layer's output runs Python bytecode once per layer
    during the pass, where the interpreter handles pending signals.
    """

    def attach(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(_pass_gradient)

    for name, module in model.named_modules():
        if name.count(".") == 1 and name.split(".")[0] in ("encoder", "decoder"):  # encoder.0, decoder.2, ...
            module.register_forward_hook(attach)


def _pass_gradient(grad: torch.Tensor) -> None:
    return None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(recipe: Recipe, progress: bool = True) -> TrainResult:
    """Train (or resume) the recipe's model under recipe.output_dir."""
    trainer = Trainer(recipe, progress)
    try:
        return trainer.run()
    finally:
        dist.shutdown(trainer.ctx)
