"""The recipe: a typed, validated description of one experiment.

`load_recipe(path, overrides)` is the only function that reads recipe YAML. It applies
`--set a.b=value` overrides before validation (so they pass the same checks), resolves
paths relative to the recipe file, and turns every validation problem into one
`RecipeError` whose message lists all problems, each naming the file and the key path.

This room does not import torch: `translate recipe show` and validation stay fast.
Public names: Recipe and its sections, RecipeError, load_recipe, recipe_from_dict, dump_recipe.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

__all__ = [
    "UserError",
    "RecipeError",
    "Split",
    "ReplaySplit",
    "Corpus",
    "DataConfig",
    "TokenizerConfig",
    "ModelConfig",
    "TrainConfig",
    "DecodeConfig",
    "Recipe",
    "resolve_decode",
    "load_recipe",
    "recipe_from_dict",
    "dump_recipe",
    "parse_override",
    "check_data_files",
]


class UserError(ValueError):
    """Base of every user-facing error (bad recipe, data, checkpoint...): printed as one line, exit 2."""


class RecipeError(UserError):
    """A user mistake in a recipe or an override; the message is ready to print."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Split(_Strict):
    """One parallel split: two plain-text files (one sentence per line) or one TSV file."""

    src: Optional[Path] = Field(None, description="source-side text file, one sentence per line")
    tgt: Optional[Path] = Field(None, description="target-side text file, line-aligned with src")
    tsv: Optional[Path] = Field(None, description="alternative: one file, 'source<TAB>target' per line")
    refs: list[Path] = Field(default_factory=list, description="extra reference files (scoring only)")
    max_lines: int = Field(0, ge=0, description="read only the first N lines (0 = all): quick experiments")

    @model_validator(mode="after")
    def _one_layout(self) -> "Split":
        if self.tsv is not None and (self.src is not None or self.tgt is not None):
            raise ValueError("give either 'tsv' or 'src'+'tgt', not both")
        if self.tsv is None and (self.src is None or self.tgt is None):
            raise ValueError("give both 'src' and 'tgt' (or a single 'tsv')")
        return self


class ReplaySplit(Split):
    """Pairs of another corpus (typically the parent model's) mixed into training to limit forgetting."""

    ratio: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="fraction of the training pairs drawn from this corpus "
        "(sampled without replacement with the recipe seed)",
    )


class Corpus(Split):
    """One of several training corpora (`data.corpora`), with its sampling weight."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names its prepared shards and its counts"
    )
    weight: float = Field(
        1.0,
        gt=0.0,
        description="epoch multiplier: an epoch takes weight x this corpus's pairs (the integer part as "
        "full passes, the fraction as a fresh sample each epoch, seeded by the recipe seed and epoch)",
    )


class DataConfig(_Strict):
    """Corpus files and the length filter applied to training pairs."""

    train: Optional[Split] = Field(None, description="the training corpus (or give several as data.corpora)")
    corpora: list[Corpus] = Field(
        default_factory=list, description="several training corpora, each with a name and a weight"
    )
    dedup: bool = Field(False, description="drop exact duplicate pairs within each training corpus (translate prepare)")
    replay: Optional[ReplaySplit] = Field(None, description="fine-tuning: mix in pairs of the parent's corpus")
    dev: Optional[Split] = None
    test: Optional[Split] = None
    src_lang: str = "src"
    tgt_lang: str = "tgt"
    max_len: int = Field(256, ge=4, description="training pairs longer than this (in pieces) are dropped")
    max_len_ratio: float = Field(0.0, ge=0.0, description="drop pairs whose length ratio exceeds this (0 = off)")
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="'strict': non-UTF-8 bytes are an error; 'replace': replaced by U+FFFD and counted"
    )

    @model_validator(mode="after")
    def _one_training_set(self) -> "DataConfig":
        if (self.train is None) == (not self.corpora):
            raise ValueError("give either 'train' (one corpus) or 'corpora' (a list of named corpora), not both")
        names = [c.name for c in self.corpora]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"replay"} & set(names)))
        if dup:
            raise ValueError(f"corpus names must be unique and not 'replay': {', '.join(dup)}")
        return self

    def training_corpora(self) -> list[Corpus]:
        """The training corpora: `corpora`, or `train` as one corpus named 'train' of weight 1."""
        if self.corpora:
            return list(self.corpora)
        assert self.train is not None
        return [Corpus(name="train", **self.train.model_dump())]


class TokenizerConfig(_Strict):
    """SentencePiece training options."""

    type: Literal["unigram", "bpe"] = "unigram"
    joint: bool = Field(True, description="one vocabulary shared by both sides")
    vocab_size: int = Field(8000, ge=16)
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    input_sentence_size: int = Field(
        1_000_000,
        ge=0,
        description="train on at most this many pairs, a reproducible uniform sample of the training corpora "
        "(reservoir sampling while streaming them: memory bounded whatever their size; 0 = all)",
    )
    byte_fallback: bool = Field(
        False,
        description="characters outside the vocabulary become UTF-8 byte pieces instead of <unk> "
        "(256 of vocab_size): any text can be encoded and reproduced, e.g. a new domain when fine-tuning",
    )
    user_defined_symbols: list[str] = Field(default_factory=list)


class ModelConfig(_Strict):
    """Transformer shape (Vaswani et al. 2017) and its options."""

    d_model: int = Field(512, ge=8)
    n_heads: int = Field(8, ge=1)
    n_encoder_layers: int = Field(6, ge=1)
    n_decoder_layers: int = Field(6, ge=1)
    ff_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu"] = "relu"
    norm: Literal["post", "pre"] = "post"
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_positions: int = Field(1024, ge=8)
    tie_output: bool = Field(True, description="decoder input embedding = output projection")
    share_embeddings: bool = Field(True, description="source = target embedding (needs a joint vocabulary)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class TrainConfig(_Strict):
    """Optimisation, budgets, validation and checkpointing."""

    batch_tokens: int = Field(4096, ge=16, description="max padded tokens per batch and side")
    accum_steps: int = Field(1, ge=1)
    pad_multiple: int = Field(
        1, ge=1, le=64, description="round each batch's padded lengths up to a multiple of this (fewer shapes)"
    )
    max_steps: int = Field(0, ge=0, description="0 = no step limit")
    max_epochs: int = Field(0, ge=0, description="0 = no epoch limit")
    max_time: float = Field(0.0, ge=0.0, description="wall-clock budget in minutes (0 = none)")
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-9, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["noam", "inverse_sqrt", "budget"] = "noam"
    lr_factor: float = Field(2.0, gt=0.0, description="noam: lr = factor * d^-0.5 * min(s^-0.5, s*w^-1.5)")
    peak_lr: float = Field(5e-4, gt=0.0, description="inverse_sqrt, budget: the lr reached at the end of warmup")
    warmup_steps: int = Field(4000, ge=1, description="noam, inverse_sqrt: warm-up length in updates")
    warmup_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="budget: warm-up length as a fraction of the training budget"
    )
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    clip_norm: float = Field(0.0, ge=0.0, description="0 = no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = the fastest native on the device (precision.py): bf16 on CPUs with native bf16 "
        "and CUDA >= 8.0, fp16 on older CUDA, else fp32",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int = Field(0, ge=0, description="CPU threads (0 = all cores)")
    log_every: int = Field(50, ge=1)
    valid_every: int = Field(500, ge=1)
    valid_beam: int = Field(1, ge=1)
    valid_max_sentences: int = Field(0, ge=0, description="decode at most this many dev lines (0 = all)")
    best_metric: Literal["bleu", "chrf", "loss"] = "bleu"
    patience: int = Field(0, ge=0, description="stop after this many validations without improvement (0 = off)")
    keep_last: int = Field(3, ge=1)
    average_last: int = Field(0, ge=0, description="average the last N checkpoints into average.pt (0 = off)")
    init_from: Optional[Path] = Field(
        None,
        description="fine-tune: start from this checkpoint's weights, tokenizer "
        "and model shape (used only while the run has no last.pt)",
    )
    freeze: list[Literal["embeddings", "encoder", "decoder"]] = Field(
        default_factory=list, description="parameter groups not trained (embeddings includes a tied output layer)"
    )


class DecodeConfig(_Strict):
    """Every decoding setting, the one type from recipe / command line / checkpoint to the search.

    `beam` ... `stop_early` steer the search; `batch_tokens`, `workers` and `precision` only
    its speed. A checkpoint stores one (the recipe's decode section, later `translate tune`'s
    winner); `resolve_decode` layers the sources in their documented precedence.
    """

    beam: int = Field(5, ge=1)
    n_best: int = Field(1, ge=1)
    alpha: float = Field(0.6, ge=0.0, description="length-penalty exponent")
    beta: float = Field(0.0, ge=0.0, description="coverage-penalty weight")
    length_penalty: Literal["gnmt", "power"] = "gnmt"
    min_len: int = Field(0, ge=0)
    max_len_a: float = Field(1.5, ge=0.0)
    max_len_b: int = Field(10, ge=0)
    no_repeat_ngram: int = Field(0, ge=0)
    repeat_guard: int = Field(
        0,
        ge=0,
        description="forbid a token that would repeat one n-gram (n <= 8 pieces) this many times in a row (0 = off)",
    )
    sample: bool = False
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0 = greedy (argmax)")
    seed: int = 0
    stop_early: bool = Field(
        True,
        description="a sentence is done once it has `beam` finished hypotheses "
        "(fairseq); false: only when no open one can still win",
    )
    batch_tokens: int = Field(4096, ge=16)
    workers: int = Field(
        0,
        ge=0,
        description="batches searched at once, one thread each, sharing the CPU threads "
        "(0 = one per thread, at most 4); speed only",
    )
    precision: Literal["auto", "fp32", "bf16-matmul", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto = the fastest batch-invariant precision (precision.py): bf16-matmul on CPUs with "
        "native bf16 (AVX512_BF16/AMX), else fp32; bf16-matmul = matrix products on bf16 inputs, fp32 "
        "results and everything else fp32 (CPU); bf16/fp16 autocast; int8 = dynamically quantised linear "
        "layers (CPU); bf16, fp16 and int8 are not batch-invariant and never chosen by auto",
    )

    @model_validator(mode="after")
    def _n_best_fits(self) -> "DecodeConfig":
        if self.n_best > self.beam and not self.sample:
            raise ValueError(f"n_best ({self.n_best}) must not exceed beam ({self.beam})")
        return self


class Recipe(_Strict):
    """A whole experiment: data → tokenizer → model → train → decode, under output_dir."""

    output_dir: Path
    seed: int = 1
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    @model_validator(mode="after")
    def _sharing_needs_joint(self, info: ValidationInfo) -> "Recipe":
        if self.model.share_embeddings and not self.tokenizer.joint:
            raise ValueError("model.share_embeddings needs tokenizer.joint: true (or set it to false)")
        stored = bool((info.context or {}).get("stored"))  # a checkpoint's recipe: its budgets are history
        if not stored and not (self.train.max_steps or self.train.max_epochs or self.train.max_time):
            raise ValueError(
                "train.max_steps, train.max_epochs and train.max_time are all 0: training would never "
                "stop; set at least one of them"
            )
        if len(set(self.train.freeze)) == 3:
            raise ValueError("train.freeze: freezing embeddings, encoder and decoder leaves nothing to train")
        if self.train.schedule == "budget" and not (self.train.max_steps or self.train.max_time):
            raise ValueError("train.schedule budget needs a budget to fit: set train.max_steps or train.max_time")
        if self.data.max_len > self.model.max_positions:
            raise ValueError(
                f"data.max_len ({self.data.max_len}) must not exceed model.max_positions ({self.model.max_positions})"
            )
        return self


# ---------------------------------------------------------------------------------------- decoding settings


def resolve_decode(
    stored: DecodeConfig, recipe: Optional[DecodeConfig] = None, options: Optional[dict[str, Any]] = None
) -> DecodeConfig:
    """The decoding settings to use, validated once as a whole.

    Precedence, highest first: command-line `options` (None = not given) > keys the recipe gives
    explicitly (`recipe.model_fields_set`: written in the YAML or set with --set) > the stored
    (checkpoint's, possibly tuned) values > the defaults. Errors name the command-line option
    (`--n-best`) or the recipe key (`decode.n_best`) that brought the offending value.
    """
    explicit = recipe.model_dump(include=recipe.model_fields_set) if recipe is not None else {}
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = set(given) - set(DecodeConfig.model_fields)
    if unknown:
        raise RecipeError(f"unknown decoding option(s): {', '.join(sorted(unknown))}")
    try:
        return DecodeConfig.model_validate({**stored.model_dump(), **explicit, **given})
    except ValidationError as exc:

        def name(err: dict) -> str:
            key = str(err["loc"][0]) if err["loc"] else ""
            return f"--{key.replace('_', '-')}" if key in given else f"decode.{key}" if key else "decode"

        raise RecipeError(
            "; ".join(
                f"{name(e)}: {e['msg'].removeprefix('Value error, ')}"
                + ("" if e["type"] == "value_error" else f" (got {e.get('input')!r})")
                for e in exc.errors()
            )
        ) from None


# ---------------------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'a.b.c=value' into (['a','b','c'], value), the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {'.'.join(keys)}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def _valid_keys(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """The field names valid at the parent of loc (for 'did you mean')."""
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def _describe(err: dict, source: str) -> str:
    loc = list(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        close = difflib.get_close_matches(key, _valid_keys(Recipe, loc), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: {path}: unknown key{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] in ("missing", "value_error") else f" (got {err.get('input')!r})"
    return f"{source}: {path}: {msg}{got}"


def recipe_from_dict(
    tree: dict, source: str = "<recipe>", base_dir: Path | None = None, stored: bool = False
) -> Recipe:
    """Validate a plain dict; relative paths are resolved against base_dir.

    stored=True: the recipe kept in a checkpoint, which is read even if it would no longer be
    accepted to start a run (all budgets 0, written before that became an error).
    """
    try:
        recipe = Recipe.model_validate(tree, context={"stored": stored})
    except ValidationError as exc:
        raise RecipeError("\n".join(_describe(e, source) for e in exc.errors())) from None
    return _resolve_paths(recipe, base_dir) if base_dir is not None else recipe


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def fix(p: Optional[Path]) -> Optional[Path]:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    def fix_split(s: Optional[Split]) -> Optional[Split]:
        if s is None:
            return None
        return s.model_copy(
            update={"src": fix(s.src), "tgt": fix(s.tgt), "tsv": fix(s.tsv), "refs": [fix(r) for r in s.refs]}
        )

    splits = ("train", "replay", "dev", "test")
    update: dict[str, Any] = {k: fix_split(getattr(recipe.data, k)) for k in splits}
    update["corpora"] = [fix_split(c) for c in recipe.data.corpora]
    data = recipe.data.model_copy(update=update)
    train = recipe.train.model_copy(update={"init_from": fix(recipe.train.init_from)})
    return recipe.model_copy(update={"data": data, "train": train, "output_dir": fix(recipe.output_dir)})


def load_recipe(path: Path | str, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, expected a YAML recipe file")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    for text in overrides:
        _apply_override(tree, *parse_override(text))
    return recipe_from_dict(tree, str(path), path.resolve().parent)


def check_data_files(recipe: Recipe) -> None:
    """Raise one RecipeError listing every data file that is missing or not a regular file."""
    problems = []
    named = [(name, getattr(recipe.data, name)) for name in ("train", "replay", "dev", "test")]
    named[1:1] = [(f"corpora[{i}]", c) for i, c in enumerate(recipe.data.corpora)]
    for name, split in named:
        if split is None:
            continue
        for key in ("src", "tgt", "tsv"):
            path = getattr(split, key)
            if path is not None and not path.is_file():
                what = "is a directory, not a file" if path.is_dir() else "file not found"
                problems.append(f"{path}: {what} (data.{name}.{key})")
        for i, ref in enumerate(split.refs):
            if not ref.is_file():
                problems.append(f"{ref}: file not found (data.{name}.refs[{i}])")
    if problems:
        raise RecipeError("\n".join(problems))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults included) as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
