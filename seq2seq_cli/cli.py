"""The `translate` command line (Typer). Thin: parse options, call one workflow function, print.

User mistakes (bad recipe, missing or malformed file, unusable checkpoint) end with a one-line
`error: ...` on stderr and exit code 2; a signal during training exits 130/143 after saving.
Heavy modules (torch) are imported inside the commands so `--help` and `recipe show` are quick.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from .recipe import UserError, dump_recipe, load_recipe

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="translate: train and run Transformer translation models from YAML recipes.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.")
app.add_typer(recipe_app, name="recipe")

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe file", show_default=False)]
SetOpt = Annotated[
    Optional[List[str]], typer.Option("--set", help="override a recipe key: KEY.PATH=VALUE (repeatable)")
]


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our user-facing exceptions into `error: ...` + exit 2 (130/143 for signals)."""
    try:
        yield
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:  # TrainingInterrupted is imported lazily; match it by its exit_code
        if hasattr(exc, "exit_code") and type(exc).__name__ == "TrainingInterrupted":
            sys.stderr.write(f"{exc}\n")
            raise typer.Exit(exc.exit_code) from None  # type: ignore[attr-defined]
        raise


def _quiet_broken_pipe() -> None:
    """The reader went away (`| head`): stop quietly, without Python's flush-time complaint."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


def _load(recipe: Path, overrides: Optional[List[str]], check_files: bool = True):
    from .recipe import check_data_files

    r = load_recipe(recipe, overrides or [])
    if check_files:
        check_data_files(r)
    return r


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        force=True,
        handlers=[RichHandler(show_path=False, show_time=False, markup=False, console=_stderr_console())],
    )


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the fully resolved recipe, defaults included.

    Example: translate recipe show recipes/tiny.yaml --set train.max_steps=10
    """
    with _user_errors():
        typer.echo(dump_recipe(load_recipe(recipe, set_ or [])), nl=False)


@app.command()
def tokenizer(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Train the recipe's sentencepiece model(s) on its training corpus.

    Writes OUTPUT_DIR/tokenizer/ and reports the vocabulary size and the average number of
    pieces per sentence on each side.

    Example: translate tokenizer recipes/bible-en-es.yaml
    """
    _setup_logging()
    with _user_errors():
        from .pipeline import run_tokenizer

        report = run_tokenizer(_load(recipe, set_))
        typer.echo(json.dumps(report))


@app.command()
def prepare(
    recipe: RecipeArg,
    set_: SetOpt = None,
    workers: Annotated[int, typer.Option(min=0, help="encoding processes (0 = all cores)")] = 0,
    force: Annotated[bool, typer.Option(help="rebuild every corpus even if it is up to date")] = False,
    progress: Annotated[bool, typer.Option(help="show the live progress bar")] = True,
) -> None:
    """Encode the training corpora into binary shards under OUTPUT_DIR/prepared/ (training reads them).

    Streams each corpus once (plain or .gz), applies the recipe's filters (blank pairs, data.max_len,
    data.max_len_ratio, data.dedup) and encodes it in worker processes. Corpora whose inputs,
    tokenizer and settings are unchanged are skipped. Trains the tokenizer first when it is missing.

    Example: translate prepare recipes/bible-en-es.yaml --workers 2
    """
    _setup_logging()
    with _user_errors():
        from .pipeline import run_prepare, run_tokenizer

        r = _load(recipe, set_)
        from .checkpoint import RunDir
        from .tokenizer import Tokenizer, TokenizerError

        if r.train.init_from is None:
            try:
                Tokenizer.load(RunDir(r.output_dir).tokenizer)
            except TokenizerError:
                run_tokenizer(r)
        typer.echo(json.dumps(run_prepare(r, workers=workers, progress=progress, force=force)))


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    nproc: Annotated[int, typer.Option(help="launch N local training processes (torch elastic)")] = 1,
    progress: Annotated[bool, typer.Option(help="show the live progress bar")] = True,
) -> None:
    """Train (or resume) the recipe's Transformer; checkpoints go to OUTPUT_DIR/checkpoints.

    Running it again on the same output directory resumes from checkpoints/last.pt.
    Ctrl-C saves a checkpoint and exits (code 130).

    Example: translate train recipes/tiny.yaml --set train.max_steps=200
    """
    _setup_logging()
    with _user_errors():
        r = _load(recipe, set_)
        if nproc > 1:
            from .launch import launch_local

            code, result = launch_local(recipe, set_ or [], nproc)
            if result is not None:
                typer.echo(json.dumps(result))
            raise typer.Exit(code)
        from .pipeline import run_train

        result = run_train(r, progress=progress)
        if int(os.environ.get("RANK", "0")) == 0:
            typer.echo(json.dumps(result))


@app.command()
def decode(
    checkpoints: Annotated[List[Path], typer.Argument(help="checkpoint file(s); several = an ensemble")],
    input: Annotated[str, typer.Option("-i", "--input", help="input file, or - for stdin")] = "-",
    output: Annotated[str, typer.Option("-o", "--output", help="output file, or - for stdout")] = "-",
    beam: Annotated[Optional[int], typer.Option(min=1, help="beam size (1 = greedy)")] = None,
    alpha: Annotated[Optional[float], typer.Option(min=0.0, help="length-penalty exponent")] = None,
    beta: Annotated[Optional[float], typer.Option(min=0.0, help="coverage-penalty weight")] = None,
    length_penalty: Annotated[Optional[str], typer.Option(help="gnmt: ((5+|Y|)/6)^alpha; power: |Y|^alpha")] = None,
    n_best: Annotated[
        Optional[int], typer.Option(min=1, help="print N hypotheses per line as TSV: index, score, text")
    ] = None,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of searching")] = False,
    top_k: Annotated[Optional[int], typer.Option(min=0)] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0)] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    max_len_a: Annotated[Optional[float], typer.Option(min=0.0)] = None,
    max_len_b: Annotated[Optional[int], typer.Option(min=0)] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(min=1)] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="translate and flush each line as soon as it is read")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads (0 = all cores)")] = 0,
    encoding_errors: Annotated[
        str, typer.Option(help="strict: non-UTF-8 input is an error; replace: U+FFFD")
    ] = "strict",
    precision: Annotated[
        Optional[str],
        typer.Option(
            help="auto (bf16-matmul where bf16 is native, else fp32), fp32, bf16-matmul (bf16 products, "
            "fp32 results; batch-invariant, CPU), bf16, fp16 (autocast) or int8 (quantised linear layers, CPU)"
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(min=0, help="batches searched at once, one thread each (0 = one per CPU thread, at most 4)"),
    ] = None,
    # search options users expect, and per-line inputs for real documents
    min_len: Annotated[Optional[int], typer.Option(min=0, help="no EOS before this many target pieces")] = None,
    no_repeat_ngram: Annotated[
        Optional[int], typer.Option(min=0, help="never repeat an n-gram of this many pieces (0 = off)")
    ] = None,
    repeat_guard: Annotated[
        Optional[int],
        typer.Option(min=0, help="forbid repeating one n-gram (n <= 8 pieces) K times in a row (0 = off)"),
    ] = None,
    constraints: Annotated[
        Optional[Path],
        typer.Option(help="file, one line per input line: target phrases (tab-separated) that must appear"),
    ] = None,
    glossary: Annotated[
        Optional[Path],
        typer.Option(
            help="TSV 'source term<TAB>target term': a term found in a line (any case, whole words) "
            "must appear translated"
        ),
    ] = None,
    prefix: Annotated[
        Optional[Path],
        typer.Option(help="file, one line per input line: text the translation must start with (empty = none)"),
    ] = None,
    align: Annotated[
        bool, typer.Option("--align", help="append TAB + source-target word alignments (Pharaoh: 0-0 1-2 ...)")
    ] = False,
    split_sentences: Annotated[
        bool, typer.Option("--split-sentences", help="cut each line into sentences (pysbd), translate, rejoin")
    ] = False,
    backend: Annotated[
        str, typer.Option(help="torch (checkpoints) or ctranslate2 (one directory written by `translate export`)")
    ] = "torch",
) -> None:
    """Translate a file, or stdin line by line, with a trained checkpoint.

    One output line per input line, in input order; empty lines stay empty. Search settings
    default to the decode section stored in the checkpoint.

    --sample --temperature 0 is greedy decoding (the argmax at every step).

    Examples:
      translate decode runs/tiny/checkpoints/best.pt -i test.en -o test.hyp --beam 5
      echo "In the beginning" | translate decode runs/tiny/checkpoints/best.pt
      translate decode best.pt -i doc.en --glossary terms.tsv --align
      translate decode --backend ctranslate2 runs/tiny/ct2 -i test.en   # a `translate export` directory
    """
    _setup_logging()
    with _user_errors():
        from .translate import LineInputs, run_decode

        options = dict(
            beam=beam,
            alpha=alpha,
            beta=beta,
            length_penalty=length_penalty,
            n_best=n_best,
            sample=sample or None,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            seed=seed,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            batch_tokens=batch_tokens,
            precision=precision,
            workers=workers,
            min_len=min_len,
            no_repeat_ngram=no_repeat_ngram,
            repeat_guard=repeat_guard,
        )
        inputs = LineInputs(constraints, glossary, prefix, align, split_sentences)
        if backend != "torch":  # the CTranslate2 backend has its own workflow in ct2_backend.py
            if inputs != LineInputs():
                _fail("--constraints, --glossary, --prefix, --align and --split-sentences need --backend torch")
            _decode_ct2(backend, checkpoints, input, output, options, stream, device, threads, encoding_errors)
            return
        run_decode(checkpoints, input, output, options, stream, device, threads, encoding_errors, inputs=inputs)


def _decode_ct2(
    backend: str,
    dirs: List[Path],
    input: str,
    output: str,
    options: dict,
    stream: bool,
    device: str,
    threads: int,
    encoding_errors: str,
) -> None:
    """`decode --backend ctranslate2 DIR` (issue 19): checks the options that do not apply, then runs."""
    if backend != "ctranslate2":
        _fail(f"--backend must be torch or ctranslate2, not {backend!r}")
    if len(dirs) != 1:
        _fail("--backend ctranslate2 takes one export directory (no ensembles)")
    from .ct2_backend import run_decode_ct2

    run_decode_ct2(dirs[0], input, output, options, stream, device, threads, encoding_errors)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint file to export")],
    output: Annotated[Path, typer.Option("-o", "--output", help="model directory to write")],
    format: Annotated[str, typer.Option("--format", help="export format (ctranslate2)")] = "ctranslate2",
    quantization: Annotated[
        str, typer.Option(help="float32, int8, int8_float32 or bfloat16 (weights on disk)")
    ] = "float32",
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty output directory")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="decode a sample with both decoders and "
            "refuse the export if greedy float32 output differs on >1% of lines",
        ),
    ] = True,
    check_lines: Annotated[int, typer.Option(min=1, help="lines of the dev set (or built-in sample) checked")] = 200,
) -> None:
    """Export a checkpoint to a self-contained CTranslate2 model directory (with a parity check).

    The directory holds the CTranslate2 model, the sentencepiece model(s) and the decode defaults;
    decode with it through `translate decode --backend ctranslate2 DIR`. Needs ctranslate2 (the "export" extra).

    Example: translate export runs/bible-en-es/checkpoints/best.pt -o runs/bible-en-es/ct2 --quantization int8
    """
    _setup_logging()
    with _user_errors():
        if format != "ctranslate2":
            _fail(f"--format must be ctranslate2, not {format!r}")
        from .export import export_ctranslate2

        report = export_ctranslate2(checkpoint, output, quantization, force, check, check_lines)
        typer.echo(json.dumps(report))


@app.command()
def score(
    hypothesis: Annotated[str, typer.Argument(help="hypothesis file, or - for stdin")],
    references: Annotated[List[Path], typer.Argument(help="one or more reference files")],
    metrics: Annotated[str, typer.Option(help="comma-separated: bleu,chrf,ter")] = "bleu,chrf,ter",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    sentence: Annotated[bool, typer.Option("--sentence", help="per-line scores")] = False,
    baseline: Annotated[Optional[Path], typer.Option(help="compare with this system (paired bootstrap)")] = None,
) -> None:
    """Score detokenised hypotheses against references with sacrebleu (BLEU, chrF, TER).

    Example: translate score runs/bible-en-es/test.hyp data/bible-en-es/test.es
    """
    with _user_errors():
        typer.echo(
            _score_report(
                hypothesis,
                references,
                [m.strip().lower() for m in metrics.split(",") if m.strip()],
                as_json,
                sentence,
                baseline,
            )
        )


def _score_report(
    hypothesis: str, references: List[Path], metrics: List[str], as_json: bool, sentence: bool, baseline: Optional[Path]
) -> str:
    """Read the files, check line counts, and format corpus / sentence / paired-bootstrap results."""
    from .data import read_lines
    from .score import check_same_length, corpus_scores, paired_bootstrap, sentence_scores

    hyps = read_lines(Path("/dev/stdin")) if hypothesis == "-" else read_lines(Path(hypothesis))
    refs = [read_lines(r) for r in references]
    check_same_length(hyps, refs, [hypothesis] + [str(r) for r in references])
    results = corpus_scores(hyps, refs, metrics)
    out: dict = {"scores": [r.__dict__ for r in results]}
    if sentence:
        out["sentences"] = {m: sentence_scores(hyps, refs, m) for m in metrics}
    if baseline is not None:
        base = read_lines(baseline)
        check_same_length(base, refs, [str(baseline)] + [str(r) for r in references])
        out["paired_bootstrap"] = [paired_bootstrap(base, hyps, refs, m) for m in metrics]
    if as_json:
        return json.dumps(out, ensure_ascii=False, indent=1)
    lines = [f"{r.text}\n  signature: {r.signature}" for r in results]
    if sentence:
        names = list(out["sentences"])
        lines += ["line\t" + "\t".join(names)] + [
            f"{i + 1}\t" + "\t".join(f"{out['sentences'][m][i]:.2f}" for m in names) for i in range(len(hyps))
        ]
    for t in out.get("paired_bootstrap", []):
        verdict = "significant" if t["significant"] else "not significant"
        lines.append(
            f"{t['metric']}: baseline {t['baseline']:.2f} -> system {t['system']:.2f} "
            f"(95% CI {t['system_ci95'][0]:.2f}-{t['system_ci95'][1]:.2f}), p = {t['p_value']:.4f}: {verdict}"
        )
    return "\n".join(lines)


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="rerun every stage even if its inputs are unchanged")] = False,
    progress: Annotated[bool, typer.Option(help="show the live progress bar")] = True,
) -> None:
    """Run the whole recipe: tokenizer → train → decode the test set → score.

    A stage whose inputs (recipe sections and files) are unchanged since it last completed is
    skipped; an interrupted training stage resumes.

    Example: translate run recipes/tiny.yaml
    """
    _setup_logging()
    with _user_errors():
        from .pipeline import run_pipeline

        result = run_pipeline(_load(recipe, set_), force=force, progress=progress)
        typer.echo(json.dumps(result))


@app.command()
def average(
    checkpoints: Annotated[List[Path], typer.Argument(help="checkpoints of the same model")],
    output: Annotated[Path, typer.Option("-o", "--output", help="averaged checkpoint to write")],
) -> None:
    """Average the weights of several checkpoints into one (for decoding).

    Example: translate average runs/x/checkpoints/step-*.pt -o runs/x/checkpoints/avg.pt
    """
    with _user_errors():
        from .checkpoint import average_checkpoints, save_checkpoint

        save_checkpoint(output, average_checkpoints(checkpoints))
        typer.echo(str(output))


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"expected comma-separated numbers, got {text!r}")
        return []


@app.command()
def tune(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint whose decode defaults to tune")],
    beams: Annotated[str, typer.Option(help="beam sizes to try")] = "1,4,6",
    alphas: Annotated[str, typer.Option(help="length-penalty alphas to try")] = "0.2,0.6,1.0",
    betas: Annotated[str, typer.Option(help="coverage betas to try at the best beam/alpha")] = "0.1,0.2",
    src: Annotated[Optional[Path], typer.Option(help="dev source (default: the recipe's dev set)")] = None,
    ref: Annotated[Optional[Path], typer.Option(help="dev reference")] = None,
    max_sentences: Annotated[int, typer.Option(min=0, help="use the first N dev lines (0 = all)")] = 500,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="write here instead of in place")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    threads: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Search beam size, length-penalty alpha and coverage beta on the dev set; store the best.

    The winner becomes the checkpoint's decode default (used by `translate decode`).

    Example: translate tune runs/bible-en-es/checkpoints/best.pt --beams 4,6 --alphas 0.6,1.0
    """
    _setup_logging()
    with _user_errors():
        from .tune import tune as run_tune

        result = run_tune(
            checkpoint,
            [int(b) for b in _floats(beams)],
            _floats(alphas),
            _floats(betas),
            src,
            ref,
            max_sentences,
            output,
            device,
            threads,
        )
        typer.echo(json.dumps(result))


@app.command()
def bench(
    recipe: RecipeArg,
    set_: SetOpt = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="model for the decoding part (default: best.pt)")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="updates not counted")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="updates measured (when --minutes is 0)")] = 30,
    minutes: Annotated[float, typer.Option(min=0.0, help="train for this long instead, as a real run")] = 0.0,
    lines: Annotated[int, typer.Option(min=1, help="test lines to decode")] = 500,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure training and decoding speed of the recipe's model on this machine.

    Reports the CPU (model, ISA, native bf16, what precision auto picks), matmul peak (fp32/bf16),
    training tokens/s through the real training loop (validation and checkpoints included, as in
    `translate train`), FLOPs/token and MFU, greedy and beam-5 decoding speed, peak RSS of each
    part, and the time to the first stdin translation.

    Example: translate bench recipes/bible-en-es.yaml --minutes 5
    """
    with _user_errors():
        from .bench import run_bench

        result = run_bench(recipe, set_ or [], checkpoint, warmup, steps, lines, minutes)
        if as_json:
            typer.echo(json.dumps(result, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"translate bench {recipe}")
        table.add_column("measure")
        table.add_column("value", justify="right")
        t, m, mach = result["train"], result["matmul"], result["machine"]
        rows = [
            ("CPU", mach["description"]),
            ("precision auto: train / decode", f"{mach['auto_train']} / {mach['auto_decode']}"),
            ("matmul fp32 / bf16 GFLOP/s", f"{m['fp32_gflops']:.0f} / {m['bf16_gflops']:.0f}"),
            (f"train tokens/s ({t['precision']}, {t['threads']} threads)", f"{t['tokens_per_s']:.0f}"),
            ("train MFLOP/token (split)", f"{t['flops_per_token'] / 1e6:.1f}"),
            ("train model GFLOP/s, MFU", f"{t['model_gflops']:.0f}, {100 * t['mfu']:.0f}%"),
            ("train peak RSS MiB", f"{t['peak_rss_mib']:.0f}"),
        ]
        for d in result.get("decode", []):
            bleu = f", BLEU {d['bleu']:.2f}" if "bleu" in d else ""
            rows.append(
                (
                    f"decode beam {d['beam']} {d['precision']}: tgt tok/s, sent/s, RSS MiB{', BLEU' if bleu else ''}",
                    f"{d['tgt_tokens_per_s']:.0f}, {d['sent_per_s']:.1f}, {d['peak_rss_mib']:.0f}{bleu}",
                )
            )
        for note in result.get("skipped", []):
            rows.append(("skipped", note))
        if "startup_s" in result:
            rows.append(("first stdin translation (s, start-up included)", f"{result['startup_s']:.2f}"))
        for row in rows:
            table.add_row(*row)
        Console().print(table)


# ------------------------------------------------------------------ issue 18: pictures


@app.command()
def attention(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint to translate with")],
    sentence: Annotated[str, typer.Argument(help="one source sentence")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="picture to write (PNG, SVG, PDF)")] = None,
    layer: Annotated[
        Optional[int],
        typer.Option(help="decoder layer (0-based, negative from the end); default: average of all layers"),
    ] = None,
    head: Annotated[Optional[int], typer.Option(help="one head of --layer (default: average of its heads)")] = None,
    beam: Annotated[Optional[int], typer.Option(min=1, help="beam size for the translation")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
) -> None:
    """Translate one sentence and draw the cross-attention of its translation.

    Prints a coarse heatmap in the terminal; with -o also writes a labelled picture (needs
    matplotlib: pip install -e ".[plot]").

    Example: translate attention runs/bible-en-es/checkpoints/best.pt "Jesus wept." -o attn.png
    """
    _setup_logging()
    with _user_errors():
        from .plots import attention_map, save_attention_png, terminal_heatmap
        from .translate import Translator

        translator = Translator([checkpoint], device, 0, {"workers": 1})
        opts = translator.options(beam=beam, n_best=1)
        src, tgt, attn = attention_map(translator, sentence, layer, head, opts)
        what = (
            "all layers and heads averaged"
            if layer is None
            else f"layer {layer}, " + ("heads averaged" if head is None else f"head {head}")
        )
        typer.echo(f"cross-attention ({what}):\n{terminal_heatmap(src, tgt, attn)}")
        if output is not None:
            save_attention_png(src, tgt, attn, output, f"{translator.detok_ids(tgt)}\n({what})")
            typer.echo(str(output))


@app.command()
def plot(
    runs: Annotated[List[Path], typer.Argument(help="run directories (or their metrics.jsonl)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="picture to write (PNG, SVG, PDF)")],
) -> None:
    """Draw learning curves of one or more runs on one figure.

    Train loss, dev loss and dev BLEU against step and against wall-clock minutes, from each
    run's metrics.jsonl. Needs matplotlib: pip install -e ".[plot]".

    Example: translate plot runs/bible-en-es runs/bible-es-en -o curves.png
    """
    with _user_errors():
        from .plots import save_curves_png

        summary = save_curves_png(runs, output)
        typer.echo(json.dumps({"output": str(output), "runs": summary}))


# ---------------------------------------------------------------- translate serve (issue 17) --
# The only hook of the HTTP server in this file: options -> ServeConfig -> serve.run_server.
@app.command()
def serve(
    checkpoints: Annotated[
        Optional[List[Path]],
        typer.Argument(help="checkpoint(s) to serve, one model each, known by its recipe's language pair"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: all interfaces)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port, logged)")] = 8000,
    models: Annotated[Optional[Path], typer.Option(help="YAML list of models: path, source, target")] = None,
    max_chars: Annotated[int, typer.Option(min=1, help="characters per request (more: 413)")] = 20000,
    max_sentences: Annotated[int, typer.Option(min=1, help="sentences per request (more: 413)")] = 256,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="how long a batch waits for requests")] = 5.0,
    batching: Annotated[
        bool, typer.Option(help="merge concurrent requests into search batches (--no-batching: one request each)")
    ] = True,
    search_nice: Annotated[
        int, typer.Option(min=0, max=19, help="lower the search threads' priority by this (0: as the server's)")
    ] = 10,
    batch_tokens: Annotated[
        Optional[int],
        typer.Option(min=1, help="search batch budget: beam rows x source tokens (default: the model's)"),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="CPU threads (0 = all cores)")] = 0,
    precision: Annotated[
        Optional[str], typer.Option(help="auto, fp32, bf16-matmul, bf16 or int8 (default: checkpoint)")
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="batches searched at once per model")] = None,
    access_log: Annotated[bool, typer.Option(help="log one line per request")] = True,
) -> None:
    """Serve models over HTTP: JSON API, LibreTranslate and OpenNMT-py compatible endpoints, a web page.

    Sentences of concurrent requests share search batches; each answer equals `translate decode`
    of the same text. SIGTERM or Ctrl-C finishes the requests in flight, then exits.

    Examples:
      translate serve runs/bible-en-es/checkpoints/best.pt runs/bible-es-en/checkpoints/best.pt
      curl -s localhost:8000/v1/translate -d '{"text": "Jesus wept.", "target": "es"}'
    """
    _setup_logging()
    with _user_errors():
        from .serve import ServeConfig, run_server

        config = ServeConfig(
            host=host,
            port=port,
            max_chars=max_chars,
            max_sentences=max_sentences,
            max_wait_ms=max_wait_ms,
            batching=batching,
            search_nice=search_nice,
            batch_tokens=batch_tokens,
            device=device,
            threads=threads,
            precision=precision,
            workers=workers,
            access_log=access_log,
        )
        run_server(checkpoints or [], models, config)


# ------------------------------------------------------------ end of translate serve (issue 17) --


def main() -> None:
    """Console-script entry point.

    Once a command that imported torch has finished, the interpreter's own teardown (releasing
    torch's ~1,200 modules and their objects) would add ~0.4 s to every invocation. By then the
    command has closed its files (outputs and checkpoints are written atomically) and only
    buffered stdio and log handlers remain: those are flushed, then the process exits at once
    with the command's status. Exceptions that escape a command still take the normal path.
    """
    try:
        app()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if "torch" not in sys.modules:
        raise SystemExit(code)
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
