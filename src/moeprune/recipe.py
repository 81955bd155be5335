"""The recipe: one typed model holding every setting of every stage.

A recipe is a TOML file (``recipes/*.toml``). Relative paths inside it are resolved against the
directory of the recipe file, so a recipe means the same thing whatever the working directory.
``schemas/recipe.schema.json`` is generated from :class:`Recipe` (``invoke schema``) and a test
keeps the two in sync.

Loading is strict: unknown fields, wrong types and out-of-range values fail before any work,
with a message naming the file, the field, the value and what is allowed. Types are exact
(pydantic strict mode): ``ctx_size = "2048"`` or ``enable_thinking = "no"`` is refused, never
converted; the one widening allowed is an integer where a number is expected (``timeout = 120``).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeprune.dropmap.types import CRITERIA, RETENTION_STRATEGIES, Criterion, Strategy
from moeprune.errors import RecipeError

RECIPE_SCHEMA_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(_Section):
    """The base model to prune."""

    base: str = Field(
        description="Hub repo id (e.g. google/gemma-4-26B-A4B-it) or a local directory, "
        "relative to the recipe file."
    )
    revision: str | None = Field(
        default=None,
        description="Pinned Hub revision (commit sha) of the base model; required for Hub ids.",
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="dtype used to load the model for profiling."
    )
    license: str = Field(default="gemma", description="License id inherited by the pruned model.")
    name: str = Field(description="Human-readable name of the pruned model (card title).")


class CalibrationSection(_Section):
    """Calibration prompts and generation settings for profiling phase 1."""

    prompts: str = Field(description="JSONL file of prompts, relative to the recipe file.")
    domains: list[str] = Field(
        min_length=1, description="Domains that must each appear in the prompts file."
    )
    prompts_per_domain: int = Field(ge=1, description="Number of prompts expected in each domain.")
    max_new_tokens: int = Field(ge=1, le=65536, description="Greedy tokens generated per prompt.")
    enable_thinking: bool = Field(
        default=True, description="Enable thinking in the chat template where it supports it."
    )
    batch_size: int = Field(default=1, ge=1, description="Sequences per forward pass.")


class ProfileSection(_Section):
    """Profiling (phase 2, replay) settings."""

    device_map: str = Field(
        default="auto", description="accelerate device_map used to load the model ('auto', 'cpu', ...)."
    )
    top_overlap_k: int = Field(default=32, ge=1, description="Top-K used for domain overlap findings.")
    top_share_k: int = Field(default=8, ge=1, description="Top-K whose share of contribution is reported.")
    coverage_fraction: float = Field(
        default=0.80, gt=0, le=1, description="Contribution fraction for 'experts needed to reach X%'."
    )
    replay: Literal["whole", "streamed"] = Field(
        default="whole",
        description="Phase 2: 'whole' loads the whole model with device_map; 'streamed' holds one decoder "
        "layer at a time (read from the shards) plus the hidden states, for models larger than the device.",
    )
    generate: Literal["transformers", "llama-server"] = Field(
        default="transformers",
        description="Phase 1: greedy continuations with the transformers model, or from generate_gguf "
        "served by llama-server.",
    )
    generate_gguf: str | None = Field(
        default=None,
        description="Base-model GGUF (any type) that llama-server generates phase 1 from, relative to the "
        "recipe file; required when generate = 'llama-server'.",
    )
    generate_n_gpu_layers: int = Field(
        default=0, ge=0, description="Layers llama-server offloads to the GPU for phase 1 (--n-gpu-layers)."
    )
    memory_limit_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Memory budget for the profile phases on the chosen device (default: what `invoke check` "
        "measures: free GPU memory, or available RAM).",
    )
    # Not recorded in settings() (so not in the profile stage's cache key): N ranks give the same
    # statistics up to float64 summation order; profile.json records the world size instead.
    data_parallel: int = Field(
        default=1, ge=1, exclude=True,
        description="Ranks of a data-parallel profile: > 1 starts `torchrun --standalone` (loopback) with this "
        "many ranks of `invoke profile`, each with its share of the batches (gloo on CPU, NCCL on GPUs).",
    )

    @model_validator(mode="after")
    def _gguf_for_llama_server(self) -> "ProfileSection":
        if self.generate == "llama-server" and not self.generate_gguf:
            raise ValueError("generate = 'llama-server' needs generate_gguf: the base-model GGUF to serve")
        return self




class DropMapSection(_Section):
    """How experts are selected for removal."""

    strategy: Strategy = Field(description="Selection strategy.")
    criterion: Criterion = Field(
        default="contribution-sum",
        description=f"Score experts are ranked by: {', '.join(CRITERIA)}. contribution-sum sums over "
        "tokens each routed token's weighted output norm; sequence-norm-sum (the seed's) sums over "
        "sequences the sequence's whole weighted output norm, and retention is then measured on it too.",
    )
    retention_threshold: float | None = Field(
        default=None,
        description="Every layer must retain more than this fraction of its contribution; in (0, 1].",
    )
    keep_count: int | None = Field(
        default=None, ge=1, description="Experts kept per layer (uniform-count only)."
    )
    protect_top_k: int = Field(default=0, ge=0, description="Always keep each layer's top-K experts.")
    protect: Literal["super-experts"] | list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None = Field(
        default=None,
        # Unset, it stays out of settings(): recipes without it hash (and their drop maps read) as before.
        exclude_if=lambda value: value is None,
        description="Experts always kept, whatever the criterion: \"super-experts\" (REAP's rule on the profile's "
        "max activation norm, moeprune.dropmap.protect) or a list of [layer, expert] pairs.",
    )
    seed: int = Field(default=0, description="Seed of the 'random' criterion.")

    @field_validator("retention_threshold")
    @classmethod
    def _threshold_range(cls, value: float | None) -> float | None:
        if value is not None and not (0.0 < value <= 1.0):
            raise ValueError("must be in (0, 1], e.g. 0.99")
        return value

    @model_validator(mode="after")
    def _strategy_needs(self) -> DropMapSection:
        if self.strategy in RETENTION_STRATEGIES:
            if self.retention_threshold is None:
                raise ValueError(f"strategy '{self.strategy}' needs retention_threshold, e.g. 0.99")
        if self.strategy == "uniform-count" and self.keep_count is None:
            raise ValueError("strategy 'uniform-count' needs keep_count, e.g. 98")
        return self


class PruneSection(_Section):
    """Checkpoint surgery and output sharding."""

    max_shard_bytes: int = Field(ge=1024, description="Largest safetensors shard written, in bytes.")


class RecalibrateSection(_Section):
    """Router recalibration after pruning (off by default): fit the kept router tensors so the
    pruned model matches the base, by one of two objectives (``objective``)."""

    enabled: bool = Field(
        default=False,
        description="Run the recalibrate stage: the pruned checkpoint with refitted router tensors is what gets "
        "converted and evaluated (off: the plain pruned checkpoint, and no recalibrate output).",
    )
    holdout_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="Share of the calibration sequences held out (whole sequences, seeded): early stopping and "
        "the recorded before/after loss are measured on them.",
    )
    max_steps: int = Field(default=200, ge=1, description="Most optimiser steps per MoE layer (full batch, Adam).")
    learning_rate: float = Field(default=1e-4, gt=0.0, description="Adam learning rate.")
    patience_steps: int = Field(
        default=20, ge=1, description="Stop a layer after this many steps without a better held-out loss."
    )
    seed: int = Field(default=0, description="Seed of the held-out split (and, for 'model-kl', of the batch order).")
    objective: Literal["layer-mse", "model-kl"] = Field(
        default="layer-mse",
        description="'layer-mse': per MoE layer, one layer in memory, the decoder layer's output with the pruned "
        "block against the base's on the profile's calibration hidden states (max_steps, patience_steps). "
        "'model-kl': all router tensors together, KL of the pruned model's next-token distribution to the "
        "base's on recalibrate.text, with a relaxed top-k while training so the fit can change which experts "
        "a token goes to; needs the base and the pruned model in memory at once (float32, CPU). On the demo at "
        "8 of 16 experts only 'model-kl' lowers the held-out KLD (bench/recalibration.py).",
    )
    text: str | None = Field(
        default=None,
        description="objective = 'model-kl': JSONL of {\"text\": ...} documents in the format the model is "
        "scored on (plain text, chat-template conversations), relative to the recipe file; never the KLD "
        "stage's held-out text. Its sha256 and resolved path are recorded, and verify-prune's rerun reads it.",
    )
    context_tokens: int = Field(default=128, ge=2, description="objective = 'model-kl': tokens per training window.")
    batch_sequences: int = Field(default=16, ge=1, description="objective = 'model-kl': windows per Adam step.")
    epochs: int = Field(default=10, ge=1, description="objective = 'model-kl': passes over the training windows.")
    relax_tau_start: float = Field(
        default=0.3, gt=0.0, description="objective = 'model-kl': temperature of the relaxed top-k at the first step."
    )
    relax_tau_end: float = Field(
        default=0.01, gt=0.0,
        description="objective = 'model-kl': temperature at the last step (annealed geometrically; small is the hard top-k).",
    )
    validate_every_steps: int = Field(
        default=15, ge=1, description="objective = 'model-kl': steps between held-out measurements (best values kept)."
    )

    @model_validator(mode="after")
    def _model_kl_needs_text(self) -> RecalibrateSection:
        if self.enabled and self.objective == "model-kl" and not self.text:
            raise ValueError("objective = 'model-kl' needs recalibrate.text (a JSONL of documents in the scored format)")
        return self


class LlamaCppSection(_Section):
    """Where llama.cpp comes from and how it is built."""

    source: Literal["pypi-sdist", "git"] = Field(
        default="pypi-sdist", description="Take llama.cpp from the llama-cpp-python sdist or from git."
    )
    sdist_version: str = Field(default="0.3.36", description="llama-cpp-python sdist version.")
    sdist_sha256: str = Field(
        default="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        description="sha256 of the sdist archive.",
    )
    git_url: str | None = Field(default=None, description="git URL (source = 'git').")
    git_commit: str | None = Field(default=None, description="Pinned commit (source = 'git').")
    cuda: Literal["auto", "on", "off"] = Field(
        default="auto", description="Build with CUDA: auto (when nvcc and a GPU are present), on, off."
    )
    cuda_architectures: str = Field(default="80;86;89;90", description="CMAKE_CUDA_ARCHITECTURES.")
    # Not recorded in settings(): the number of jobs changes how long a build takes, not what it makes.
    jobs: int | None = Field(
        default=None, ge=1, exclude=True,
        description="Parallel compile jobs (default: the CPU count of the building machine).",
    )

    @model_validator(mode="after")
    def _git_needs_pin(self) -> LlamaCppSection:
        if self.source == "git" and not (self.git_url and self.git_commit):
            raise ValueError("source 'git' needs git_url and git_commit (a full commit sha)")
        return self


class QuantizeSection(_Section):
    """GGUF conversion and quantization."""

    convert_outtype: Literal["f16", "bf16", "f32"] = Field(default="bf16", description="Outtype of convert_hf_to_gguf.py.")
    types: list[str] = Field(default=["Q4_K_M"], min_length=1, description="llama-quantize types, e.g. Q4_K_M.")
    eval_type: str = Field(default="Q4_K_M", description="Which quantized GGUF is served for evaluation.")
    imatrix: bool = Field(default=False, description="Compute an importance matrix from the calibration text.")

    @model_validator(mode="after")
    def _eval_type_built(self) -> QuantizeSection:
        if self.eval_type not in self.types:
            raise ValueError(f"eval_type '{self.eval_type}' must be one of types {self.types}")
        return self


class ServeSection(_Section):
    """llama-server flags."""

    ctx_size: int = Field(ge=128, description="Context size in tokens (--ctx-size).")
    n_gpu_layers: int = Field(default=99, ge=0, description="Layers offloaded to the GPU (--n-gpu-layers).")
    reasoning_format: Literal["none", "deepseek", "deepseek-legacy", "auto"] = Field(
        default="deepseek", description="--reasoning-format."
    )
    reasoning_budget: int = Field(default=-1, ge=-1, description="--reasoning-budget in tokens (-1: unlimited).")
    parallel: int = Field(
        default=1, ge=1,
        description="Server slots (--parallel); eval.num_concurrent must match. More than 1 batches requests "
        "together, which can change greedy outputs slightly: keep 1 where a published run must be reproduced.",
    )
    kv_unified: bool = Field(
        default=True,
        description="With parallel > 1: one KV cache shared by all slots (--kv-unified), so every slot can use "
        "the whole ctx_size; off: each slot gets ctx_size / parallel tokens. Either way a slot must hold a "
        "prompt plus eval.max_gen_toks (checked by `invoke check`).",
    )
    seed: int = Field(default=0, description="Sampling seed (--seed).")
    threads: int | None = Field(default=None, ge=1, description="CPU threads (--threads); default: llama.cpp's.")
    dry_multiplier: float = Field(
        default=0.0, ge=0.0,
        description="DRY repetition-penalty multiplier (--dry-multiplier; 0 disables). It changes "
        "greedy answers too: the penalty is applied to the logits before the argmax.",
    )
    startup_timeout_s: float = Field(default=600.0, gt=0, description="Seconds to wait for /health.")
    # Not recorded in settings() (so not in any stage's cache key): where the layers run does not
    # change the greedy answers (tests/test_rpc.py checks it); results.json and kld.json record the
    # workers as topology instead, as profile.json records profile.data_parallel's world size.
    rpc: list[str] = Field(
        default_factory=list, exclude=True,
        description="llama.cpp RPC workers (`invoke rpc-worker` on each), as \"host:port\": llama-server and "
        "llama-perplexity get --rpc and offload serve.n_gpu_layers layers to them, split by their free memory.",
    )

    @field_validator("rpc")
    @classmethod
    def _rpc_endpoints(cls, value: list[str]) -> list[str]:
        from moeprune.llamacpp.rpc import parse_endpoint

        for entry in value:
            parse_endpoint(entry)  # ValueError naming the entry
        if len(set(value)) != len(value):
            raise ValueError("names a worker twice; list each host:port once")
        return value


class EvalSection(_Section):
    """lm-evaluation-harness settings."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names.")
    include_path: str | None = Field(
        default=None, description="Directory of local task YAMLs, relative to the recipe file."
    )
    max_gen_toks: int = Field(ge=1, description="Generation budget per answer (lm-eval default 256 is too small).")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature (0: greedy).")
    seed: int = Field(
        default=1234,
        description="lm-eval's numpy, torch and few-shot seed; also its Python random seed unless "
        "random_seed is set.",
    )
    random_seed: int | None = Field(
        default=None,
        description="lm-eval's Python random seed, which shuffles gpqa's answer choices; default: "
        "eval.seed. lm-eval's command line defaults it to 0 (--seed 0,1234,1234,1234).",
    )
    limit: int | None = Field(default=None, ge=1, description="Evaluate only the first N samples.")
    lm_eval_version: str | None = Field(
        default=None,
        description="lm-eval version the eval must run under (e.g. the seed's 0.4.11); `invoke eval` "
        "refuses another before any server starts. Default: the installed version.",
    )
    num_concurrent: int = Field(default=1, ge=1, description="Concurrent requests to the server.")
    request_timeout_s: float = Field(default=3600.0, gt=0, description="Timeout of one request.")
    max_retries: int = Field(
        default=3, ge=1,
        description="Attempts per request before the eval fails (lm-eval max_retries); greedy "
        "requests that timed out tend to time out again.",
    )
    models: list[Literal["base", "pruned"]] = Field(
        default=["base", "pruned"], min_length=1, description="Which models are evaluated."
    )
    bootstrap_resamples: int = Field(default=10000, ge=100, description="Paired bootstrap resamples.")


class HeldOutSource(_Section):
    """A held-out text fetched from one file of a Hub dataset when the kld stage runs, pinned by the
    dataset's commit and by the file's sha256 (what the Hub shows as the file's LFS oid, so anyone can
    check the pin on the Hub). The text is the file's ``column`` rows joined as they are (each row of
    wikitext keeps its own newline); kld.json records its sha256. The stage refuses a file whose
    sha256 differs."""

    dataset: str = Field(description="Hub dataset id (e.g. Salesforce/wikitext); read through the HF cache, so a "
                         "machine without internet uses a cache filled elsewhere (HF_HUB_OFFLINE=1).")
    revision: str = Field(pattern=r"^[0-9a-f]{40}$", description="The dataset's commit sha (40 hex digits).")
    file: str = Field(
        pattern=r"^[^/].*\.parquet$",
        description="The parquet file in the dataset's repository (e.g. wikitext-2-raw-v1/test-00000-of-00001.parquet).",
    )
    file_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 of that file at that commit; unset: the stage downloads it, then refuses, printing the "
        "value to pin.",
    )
    column: str = Field(default="text", description="The column whose rows are joined into the text.")

    def describe(self) -> str:
        return f"{self.dataset}@{self.revision[:12]} ({self.file})"


class KldSection(_Section):
    """Teacher-forced agreement with the base model: llama-perplexity's KL divergence.

    The base model at the converted precision is the reference; the stage measures the pruned and
    the base eval quants against it, and the base quantized to the type of ``rival_types`` whose
    file is closest in size to the pruned eval quant (the equal-size rival).
    """

    enabled: bool = Field(default=False, description="Run the kld stage (off: kld.json records that it was off).")
    text: str | None = Field(
        default=None,
        description="Held-out plain-text file (not the calibration prompts), relative to the recipe file; "
        "required when enabled.",
    )
    source: HeldOutSource | None = Field(
        default=None, description="A held-out text fetched from a pinned Hub dataset instead of a local kld.text.",
    )
    ctx_size: int = Field(default=512, ge=16, description="Tokens per chunk; the second half of each is scored.")
    chunks: int | None = Field(
        default=None, ge=1,
        description="Score this many chunks (None: all the text holds but one); the text must hold one chunk more.",
    )
    rival_types: list[str] = Field(
        default=["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S"],
        description="llama-quantize types the base is quantized to; the one whose file size is closest to the "
        "pruned eval quant is the equal-size rival (every one is measured and plotted).",
    )
    work_dir: str | None = Field(
        default=None,
        description="Directory for the reference log-probabilities, the rival quants and a fetched text (large, "
        "never published), relative to the recipe file; one subdirectory per run. Default: the run's kld/.",
    )
    self_kld_tolerance: float = Field(
        default=1e-3, gt=0,
        description="The reference measured against its own saved log-probabilities must give |KLD| at most "
        "this (nats/token; the saved log-probabilities are 16-bit, so not exactly 0).",
    )

    @model_validator(mode="after")
    def _text_when_enabled(self) -> KldSection:
        if self.text and self.source is not None:
            raise ValueError("kld.text and kld.source both name the held-out text: keep one")
        if self.enabled and not self.text and self.source is None:
            raise ValueError("kld.enabled needs kld.text, a held-out plain-text file, or kld.source, a pinned Hub "
                             "dataset (or set enabled = false)")
        return self


class CardSection(_Section):
    """Model card rendering."""

    tags: list[str] = Field(default=["moe", "expert-pruning", "gguf"], description="Hub tags.")
    language: list[str] = Field(default=["en"], description="Languages.")


class PublishSection(_Section):
    """Hugging Face Hub destination."""

    repo_id: str | None = Field(default=None, description="Repo for the safetensors artifact.")
    gguf_repo_id: str | None = Field(default=None, description="Repo for the GGUF files.")
    private: bool = Field(default=False, description="Create repos as private.")


class DiskSection(_Section):
    """Shrinking a run's footprint on disk (off by default: every file a run makes stays)."""

    delete_intermediates: bool = Field(
        default=False,
        description="Delete the unpublished converted base GGUF once the last stage that reads it has finished, "
        "and each KLD rival quant once scored; their size and sha256 stay recorded (manifest, kld.json) and "
        "a stage that needs one again regenerates it first.",
    )


class RunnerSection(_Section):
    """Where stages run."""

    kind: Literal["native", "docker"] = Field(default="native", description="Run stages here or in the image.")
    image: str = Field(default="moeprune:latest", description="Docker image tag for the docker runner.")


class Recipe(_Section):
    """Every setting of every stage. Loaded with :func:`load_recipe`."""

    schema_version: Literal[1] = Field(default=1, description="Recipe format version.")
    name: str = Field(description="Run name; outputs go to runs/<name>/.")
    description: str = Field(default="", description="One line saying what this recipe produces.")
    model: ModelSection
    calibration: CalibrationSection
    profile: ProfileSection = ProfileSection()
    dropmap: DropMapSection
    prune: PruneSection
    # Recorded in settings() only when enabled, so a recipe without it keeps its keys and hashes.
    recalibrate: RecalibrateSection = Field(
        default_factory=RecalibrateSection, exclude_if=lambda section: not section.enabled,
        description="Router recalibration after pruning (off by default).",
    )
    llamacpp: LlamaCppSection = LlamaCppSection()
    quantize: QuantizeSection = QuantizeSection()
    serve: ServeSection
    eval: EvalSection
    kld: KldSection = KldSection()
    card: CardSection = CardSection()
    publish: PublishSection = PublishSection()
    # Recorded in settings() only when on, so a recipe without it keeps its keys and hashes.
    disk: DiskSection = Field(
        default_factory=DiskSection, exclude_if=lambda section: not section.delete_intermediates,
        description="Footprint options (off by default).",
    )
    runner: RunnerSection = RunnerSection()

    # Set by load_recipe, not by the TOML: where the file lives (for relative paths).
    source_path: Annotated[Path | None, Field(exclude=True)] = None

    @model_validator(mode="after")
    def _concurrency_matches_slots(self) -> Recipe:
        # More requests than slots only queue in the server; fewer leave slots idle. Either way the
        # recorded settings would not say what ran in parallel.
        if self.eval.num_concurrent != self.serve.parallel:
            raise ValueError(
                f"eval.num_concurrent = {self.eval.num_concurrent} must equal serve.parallel = "
                f"{self.serve.parallel} (one request per server slot)"
            )
        # Whether each slot holds a prompt plus eval.max_gen_toks is the preflight's one slot rule
        # (moeprune.preflight.check_slots), which `invoke check` and every serving stage run.
        return self

    @field_validator("name")
    @classmethod
    def _name_is_dirname(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names runs/<name>/)")
        if value == "base":
            raise ValueError("'base' names the base model's GGUF files (runs/<name>/gguf/base-*.gguf); choose another")
        return value

    # --- derived paths -------------------------------------------------------------------
    def resolve(self, relative: str) -> Path:
        """Resolve a path written in the recipe against the recipe file's directory."""
        path = Path(relative).expanduser()
        if path.is_absolute() or self.source_path is None:
            return path
        return (self.source_path.parent / path).resolve()

    @property
    def base_is_local(self) -> bool:
        return _looks_local(self.model.base, self.source_path)

    @property
    def base_dir(self) -> Path | None:
        """Local directory of the base model, or None for a Hub id."""
        return self.resolve(self.model.base) if self.base_is_local else None

    @property
    def prompts_path(self) -> Path:
        return self.resolve(self.calibration.prompts)

    @property
    def kld_text_path(self) -> Path | None:
        return self.resolve(self.kld.text) if self.kld.enabled and self.kld.text else None

    @property
    def recalibrate_text_path(self) -> Path | None:
        return self.resolve(self.recalibrate.text) if self.recalibrate.text else None

    @property
    def generate_gguf_path(self) -> Path | None:
        return self.resolve(self.profile.generate_gguf) if self.profile.generate_gguf else None

    @property
    def include_path(self) -> Path | None:
        return self.resolve(self.eval.include_path) if self.eval.include_path else None

    def recorded_path(self, written: str) -> str:
        """A path written in the recipe as stages hash it and artifacts record it: never absolute.

        Named as the lock names a dependency (``checkout/...``, ``recipe/...``, ``hf-cache/...``,
        else ``external/<file name>``), so the same recipe written with relative or absolute paths,
        or run from another checkout, gives the same parameters; the file's content is hashed as
        the stage's dependency, which is what makes the number reproducible.
        """
        from moeprune.pipeline.fingerprint import Anchors, dep_key

        recipe_dir = self.source_path.parent if self.source_path is not None else None
        return dep_key(self.resolve(written), Anchors(run=None, recipe_dir=recipe_dir))  # type: ignore[arg-type]

    def settings(self) -> dict[str, Any]:
        """The recipe as plain data (what is hashed and recorded in manifests and locks).

        Every path field is recorded with :meth:`recorded_path`; a Hub base stays its id (its
        commit is recorded beside it by the stages that download it).
        """
        data = self.model_dump(mode="json")
        for section, key in PATH_FIELDS:
            value = data[section][key]
            is_hub_id = (section, key) == ("model", "base") and not self.base_is_local
            if value is not None and not is_hub_id:
                data[section][key] = self.recorded_path(value)
        return data


# The first part of every name Recipe.recorded_path gives a local path (pipeline.fingerprint's
# dep_key prefixes): such a name is never a Hub repo id.
RECORDED_PATH_ANCHORS = ("checkout", "recipe", "hf-cache", "external")
# (section, field) of every recipe field that names a file or directory.
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "base"), ("calibration", "prompts"), ("profile", "generate_gguf"), ("eval", "include_path"),
    ("kld", "text"),
)


def _looks_local(base: str, source_path: Path | None) -> bool:
    if base.startswith((".", "/", "~")):
        return True
    candidate = Path(base)
    if source_path is not None:
        candidate = source_path.parent / base
    return candidate.exists()


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe(error: dict[str, Any], data: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    field = _format_loc(loc) or "<recipe>"
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"unknown field '{field}': remove it or check its spelling"
    if kind == "missing":
        return f"missing required field '{field}'"
    if not loc:  # a check across sections: its message names the fields
        return message
    value = _lookup(data, loc)
    shown = json.dumps(value) if value is not None else "(section)"
    return f"field '{field}' = {shown}: {message}"


def parse_recipe(data: dict[str, Any], source_path: Path | None = None) -> Recipe:
    """Validate recipe data; raise RecipeError naming every bad field."""
    where = str(source_path) if source_path else "<recipe>"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err, data) for err in exc.errors()]
        raise RecipeError(f"{where}: invalid recipe:\n  - " + "\n  - ".join(problems)) from None
    return recipe.model_copy(update={"source_path": source_path})


def check_recipe_inputs(recipe: Recipe) -> None:
    """Cross-checks that need files: inputs exist, counts fit the base model.

    Raises RecipeError naming the field and the file.
    """
    where = str(recipe.source_path) if recipe.source_path else "<recipe>"
    if not recipe.prompts_path.is_file():
        raise RecipeError(
            f"{where}: field 'calibration.prompts' = {json.dumps(recipe.calibration.prompts)}: "
            f"file not found ({recipe.prompts_path}); create it or fix the path"
        )
    if recipe.kld_text_path is not None and not recipe.kld_text_path.is_file():
        raise RecipeError(
            f"{where}: field 'kld.text' = {json.dumps(recipe.kld.text)}: file not found "
            f"({recipe.kld_text_path}); point it at a held-out plain-text file or set kld.enabled = false"
        )
    text = recipe.recalibrate_text_path
    if recipe.recalibrate.enabled and recipe.recalibrate.objective == "model-kl" and text is not None and not text.is_file():
        raise RecipeError(
            f"{where}: field 'recalibrate.text' = {json.dumps(recipe.recalibrate.text)}: file not found ({text}); "
            "point it at a JSONL of documents or set recalibrate.objective = 'layer-mse'"
        )
    gguf = recipe.generate_gguf_path
    if recipe.profile.generate == "llama-server" and gguf is not None and not gguf.is_file():
        raise RecipeError(
            f"{where}: field 'profile.generate_gguf' = {json.dumps(recipe.profile.generate_gguf)}: "
            f"file not found ({gguf}); convert the base model (invoke convert --which base) and name that file"
        )
    if recipe.include_path is not None and not recipe.include_path.is_dir():
        raise RecipeError(
            f"{where}: field 'eval.include_path' = {json.dumps(recipe.eval.include_path)}: "
            f"directory not found ({recipe.include_path})"
        )
    if recipe.base_is_local:
        base_dir = recipe.base_dir
        assert base_dir is not None
        config_path = base_dir / "config.json"
        if not config_path.is_file():
            raise RecipeError(
                f"{where}: field 'model.base' = {json.dumps(recipe.model.base)}: "
                f"no config.json in {base_dir}; point it at a Hugging Face model directory"
            )
        from moeprune.arch import read_config

        # Readable JSON here; what it must say is preflight's (moe-model, expert-shapes, drop-counts).
        read_config(config_path, "base model's config.json", RecipeError)
    elif recipe.model.revision is None:
        raise RecipeError(
            f"{where}: field 'model.revision' is required for the Hub model "
            f"'{recipe.model.base}': pin the commit sha so the run is reproducible"
        )


def load_recipe(path: str | Path, check_inputs: bool = True) -> Recipe:
    """Read, validate and (by default) cross-check a recipe TOML file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}; pass --recipe with an existing recipes/*.toml")
    from moeprune.userfile import read_text

    try:
        data = tomllib.loads(read_text(path, "recipe", RecipeError))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    recipe = parse_recipe(data, source_path=path)
    if check_inputs:
        check_recipe_inputs(recipe)
    return recipe


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe file, as committed in schemas/recipe.schema.json."""
    schema = Recipe.model_json_schema(mode="validation")
    schema["properties"].pop("source_path", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://moeprune.dev/schemas/recipe.schema.json"
    schema["title"] = "moeprune recipe"
    return schema
