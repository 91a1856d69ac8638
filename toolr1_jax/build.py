"""Config -> components: the one place that turns an ml_collections config into the plain
arguments and frozen dataclasses the library takes (used by trainer.py, train.py, evaluate.py).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections

from toolr1_jax import engine as engine_lib
from toolr1_jax import update
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import pipeline, synthetic
from toolr1_jax.models import model as model_lib
from toolr1_jax.models import params as params_lib
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.rewards import reward as reward_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.tools import files, search, web


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def levels(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    text = config.data.levels
    if not text.strip():
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"data.levels must be comma-separated integers, got {text!r}") from e


def examples(config: ml_collections.ConfigDict, split: str, *, for_eval: bool = False):
    """Every example of `split` of the training (or, `for_eval`, the evaluation) dataset.

    TFDS builds the dataset into `data.data_dir` on first use.
    """
    d = config.data
    name, builder_config, manual_dir = d.name, d.config, d.manual_dir
    if for_eval and d.eval_name:
        name, builder_config = d.eval_name, d.eval_config
    if for_eval and d.eval_manual_dir:
        manual_dir = d.eval_manual_dir
    return pipeline.load_examples(
        name,
        split,
        data_dir=os.path.expanduser(d.data_dir),
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
        config=builder_config or None,
        levels=levels(config),
    )


def tools(config: ml_collections.ConfigDict) -> list:
    """File inspection always; local search and the web when configured."""
    out = [files.inspect_file_tool]
    corpus = config.sandbox.search_corpus
    if corpus == "synthetic":
        name = config.data.config or "default"
        seed = synthetic.SyntheticTasks.builder_configs[name].seed
        out.append(search.make_search_tool(synthetic.corpus(seed)))
    elif corpus:
        raise ConfigError(f"sandbox.search_corpus must be '' or 'synthetic', got {corpus!r}")
    if config.sandbox.web_search_url:
        key_env = config.sandbox.web_api_key_env
        out.extend(web.make_web_tools(config.sandbox.web_search_url, os.environ.get(key_env)))
    return out


def authorized_imports(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The configured import allowlist; None means the sandbox's default list."""
    names = tuple(m.strip() for m in config.sandbox.authorized_imports.split(",") if m.strip())
    return names or None


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
    """The reward judge. With `for_eval`, the rule judge is None: it *is* the GAIA scorer that
    evaluation always applies, so its agreement with the scorer would say nothing."""
    r = config.reward
    if r.judge == "rule":
        return None if for_eval else judge_lib.make_judge("rule")
    if r.judge == "openai":
        if not r.judge_url:
            raise ConfigError("reward.judge='openai' needs reward.judge_url (an OpenAI-style /v1).")
        return judge_lib.make_judge(
            "openai",
            base_url=r.judge_url,
            model=r.judge_model,
            api_key=os.environ.get(r.judge_api_key_env, "EMPTY") if r.judge_api_key_env else "",
            timeout_s=r.judge_timeout_s,
            max_concurrency=r.judge_max_concurrency,
        )
    if r.judge == "local":
        if not r.judge_model:
            raise ConfigError("reward.judge='local' needs reward.judge_model (a local HF dir).")
        return judge_lib.make_judge("local", model_dir=r.judge_model)
    raise ConfigError(f"reward.judge must be rule, openai or local, got {r.judge!r}")


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
