r"""Evaluates a policy checkpoint on a split: accuracy, pass@k, agent statistics, report.

  python evaluate.py --config=configs/gaia.py --model=/path/to/hf_dir --split=validation \
      --num_samples=4 --output_dir=/tmp/eval

Writes results.json, trajectories.jsonl and report.html into --output_dir (see
toolr1_jax/evaluation.py). Any config key can be overridden as usual, e.g.
`--config.data.num_eval=20 --config.reward.judge=openai --config.reward.judge_url=...`.
"""

from __future__ import annotations

import asyncio
import json
import os

import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from toolr1_jax import engine as engine_lib
from toolr1_jax import evaluation, models
from toolr1_jax.agent import prompt, rollout
from toolr1_jax.data import pipeline, synthetic
from toolr1_jax.rewards import judge as judge_lib
from toolr1_jax.sandbox import pool as pool_lib
from toolr1_jax.tools import files, search, web

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_MODEL = flags.DEFINE_string(
    "model", None, "Hugging Face model directory (default: model.init_from)."
)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Episodes per question, the n of pass@k (default: log.num_eval_samples)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the three outputs go.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "output_dir"])


def _levels(text: str) -> tuple[int, ...] | None:
    if not text.strip():
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"data.levels must be comma-separated integers, got {text!r}") from e


def _tools(config) -> list:
    """The agent's tools as the config describes them: file inspection always, local search and
    the web when configured."""
    tools = [files.inspect_file_tool]
    corpus = config.sandbox.search_corpus
    if corpus == "synthetic":
        # The corpus must come from the same world (seed) as the synthetic questions.
        name = (config.data.name == "synthetic" and config.data.config) or "default"
        if name not in synthetic.SyntheticTasks.builder_configs:
            raise ValueError(
                f"data.config {name!r} is not a synthetic builder config; known: "
                f"{sorted(synthetic.SyntheticTasks.builder_configs)}"
            )
        seed = synthetic.SyntheticTasks.builder_configs[name].seed
        tools.append(search.make_search_tool(synthetic.corpus(seed)))
    elif corpus:
        raise ValueError(f"sandbox.search_corpus must be '' or 'synthetic', got {corpus!r}")
    if config.sandbox.web_search_url:
        key_env = config.sandbox.web_api_key_env
        tools.extend(web.make_web_tools(config.sandbox.web_search_url, os.environ.get(key_env)))
    return tools


def _judge(config) -> judge_lib.Judge | None:
    r = config.reward
    if r.judge == "rule":
        # The rule judge is the GAIA scorer itself: its agreement with the scorer says nothing.
        return None
    if r.judge == "openai":
        return judge_lib.make_judge(
            "openai",
            base_url=r.judge_url,
            model=r.judge_model,
            api_key=os.environ.get(r.judge_api_key_env, "") if r.judge_api_key_env else "",
            timeout_s=r.judge_timeout_s,
            max_concurrency=r.judge_max_concurrency,
        )
    if r.judge == "local":
        return judge_lib.make_judge("local", model_dir=r.judge_model)
    raise ValueError(f"reward.judge must be rule, openai or local, got {r.judge!r}")


def _agent_config(config) -> rollout.AgentConfig:
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    model_dir = _MODEL.value or config.model.init_from
    if not model_dir:
        raise app.UsageError("Give --model (or set model.init_from in the config).")
    split = _SPLIT.value or config.data.eval_split
    num_samples = _NUM_SAMPLES.value or config.log.num_eval_samples

    examples = pipeline.load_examples(
        config.data.name,
        split,
        data_dir=os.path.expanduser(config.data.data_dir),
        manual_dir=config.data.manual_dir or None,
        config=config.data.config or None,
        levels=_levels(config.data.levels),
    )
    if config.data.num_eval > 0:
        examples = examples[: config.data.num_eval]
    logging.info(
        "evaluating %s on %d %s examples, %d sample(s) each",
        model_dir,
        len(examples),
        split,
        num_samples,
    )

    tokenizer = models.load_tokenizer(config.model.tokenizer or model_dir)
    model, _ = models.load_pretrained(model_dir, dtype=jnp.dtype(config.model.dtype))
    engine = engine_lib.Engine(
        model, num_slots=config.engine.num_slots, max_len=config.engine.max_len
    )
    sampling = engine_lib.SamplingParams(
        max_new_tokens=config.agent.max_new_tokens_per_turn,
        temperature=config.agent.temperature,
        top_p=config.agent.top_p,
        top_k=config.agent.top_k,
        seed=config.seed,
    )
    tools = _tools(config)
    imports = [m.strip() for m in config.sandbox.authorized_imports.split(",") if m.strip()]
    judge = _judge(config)

    async def run():
        async with pool_lib.SandboxPool(
            config.sandbox.num_workers,
            config.sandbox.timeout_s,
            config.sandbox.memory_mb,
            tools=tools,
            authorized_imports=imports or None,
        ) as pool:
            try:
                return await evaluation.evaluate(
                    examples,
                    engine=engine,
                    tokenizer=tokenizer,
                    pool=pool,
                    tools=tools,
                    agent_config=_agent_config(config),
                    sampling=sampling,
                    num_samples=num_samples,
                    judge=judge,
                    progress=_PROGRESS.value,
                )
            finally:
                if judge is not None:
                    await judge.aclose()

    result = asyncio.run(run())
    run_info = {
        "model": os.path.abspath(model_dir),
        "dataset": config.data.name,
        "split": split,
        "num_examples": len(examples),
        "num_samples": num_samples,
        "judge": config.reward.judge,
        "config": json.loads(config.to_json_best_effort()),
    }
    paths = evaluation.write_outputs(result, _OUTPUT_DIR.value, run_info=run_info)
    m = result.metrics
    logging.info(
        "accuracy %.4f, pass@%d %.4f, avg turns %.2f, tool-call rate %.3f, code-error rate %.3f",
        m["accuracy"],
        num_samples,
        m[f"pass@{num_samples}"],
        m["avg_turns"],
        m["tool_call_rate"],
        m["code_error_rate"],
    )
    for path in paths.values():
        logging.info("wrote %s", path)


if __name__ == "__main__":
    app.run(main)
