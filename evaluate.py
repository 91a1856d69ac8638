r"""Evaluates a policy checkpoint on a split: accuracy, pass@k, agent statistics, report.

  python evaluate.py --config=configs/gaia.py --config.data.manual_dir=~/data/gaia \
      --model=/path/to/hf_dir --split=validation --num_samples=4 --output_dir=/tmp/eval

Writes results.json, trajectories.jsonl and report.html into --output_dir (see
toolr1_jax/evaluation.py). On GAIA's test split, whose answers are hidden, there is no accuracy:
submission.jsonl is written instead, in the format GAIA's leaderboard takes. Any config key
can be overridden as usual, e.g.
`--config.data.num_eval=20 --config.reward.judge=openai --config.reward.judge_url=...`.
"""

from __future__ import annotations

import asyncio
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from toolr1_jax import build, evaluation, models
from toolr1_jax import engine as engine_lib

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "Hugging Face model directory, GGUF file or named model such as smollm2-135m-instruct "
    "(default: model.init_from).",
)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Episodes per question, the n of pass@k (default: log.num_eval_samples)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the three outputs go.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    model_dir = _MODEL.value or config.model.init_from
    if not model_dir:
        raise app.UsageError("Give --model (or set model.init_from in the config).")
    split = _SPLIT.value or config.data.eval_split
    num_samples = _NUM_SAMPLES.value or config.log.num_eval_samples

    dataset = build.dataset(config, for_eval=True)
    examples = build.examples(config, split, for_eval=True)
    num_examples = len(examples)
    if config.data.num_eval > 0:
        examples = examples[: config.data.num_eval]
    answers_hidden = evaluation.answers_hidden(examples)
    if answers_hidden and len(examples) < num_examples:
        logging.warning(
            "data.num_eval=%d: the submission will hold %d of the split's %d tasks "
            "(--config.data.num_eval=0 for all of them)",
            config.data.num_eval,
            len(examples),
            num_examples,
        )
    logging.info(
        "evaluating %s on %d %s examples of %s (config %s), %d sample(s) each%s",
        model_dir,
        len(examples),
        split,
        dataset.name,
        dataset.config,
        num_samples,
        "; the answers are hidden: writing a submission file, no accuracy"
        if answers_hidden
        else "",
    )

    tokenizer = models.load_tokenizer(config.model.tokenizer or model_dir)
    model, _ = models.load_pretrained(model_dir, dtype=build.dtype(config))
    engine = engine_lib.Engine(
        model, num_slots=config.engine.num_slots, max_len=config.engine.max_len
    )
    sampling = build.sampling(config, seed=config.seed, for_eval=True)
    tools = build.tools(config, for_eval=True)
    # GAIA's scorer grades every episode; a judge is an extra opinion, so a config that names a
    # judge server for training but gives none (configs/gaia.py) still evaluates.
    judge = None
    if answers_hidden:
        logging.info("not judged: the answers are hidden")
    elif config.reward.judge == "openai" and not config.reward.judge_url:
        logging.info("not judged: reward.judge_url is empty; GAIA's scorer grades the episodes")
    else:
        judge = build.judge(config, for_eval=True)

    async def run():
        async with build.sandbox_pool(config, tools) as pool:
            try:
                return await evaluation.evaluate(
                    examples,
                    engine=engine,
                    tokenizer=tokenizer,
                    pool=pool,
                    tools=tools,
                    agent_config=build.agent_config(config),
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
        # A named model is recorded by its name, a path as an absolute path.
        "model": model_dir if models.sources.is_named(model_dir) else os.path.abspath(model_dir),
        "dataset": dataset.name,
        "dataset_config": dataset.config,
        "manual_dir": dataset.manual_dir,
        "split": split,
        "num_examples": len(examples),
        "num_samples": num_samples,
        "judge": config.reward.judge if judge is not None else "",
        "config": json.loads(config.to_json_best_effort()),
    }
    paths = evaluation.write_outputs(result, _OUTPUT_DIR.value, run_info=run_info)
    m = result.metrics
    if not answers_hidden:
        logging.info(
            "accuracy %.4f, pass@%d %.4f", m["accuracy"], num_samples, m[f"pass@{num_samples}"]
        )
    logging.info(
        "answer rate %.3f, avg turns %.2f, tool-call rate %.3f, code-error rate %.3f",
        m["answer_rate"],
        m["avg_turns"],
        m["tool_call_rate"],
        m["code_error_rate"],
    )
    for path in paths.values():
        logging.info("wrote %s", path)


if __name__ == "__main__":
    app.run(main)
