r"""Tool-R1 on GAIA: GRPO with the dynamic sample queue, Qwen2.5-7B-Instruct, an LLM judge.

The paper's setting. Needs, on local disk:
  * the policy: `huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir ~/models/qwen2.5-7b`
    (then `model.init_from`);
  * GAIA (gated on the Hugging Face hub: gaia-benchmark/GAIA), the folder holding `2023/` in
    `data.manual_dir`:
      huggingface-cli download gaia-benchmark/GAIA --repo-type dataset --local-dir ~/data/gaia
  * for training, questions (JSONL or parquet with question, answer, optional level and files) in
    `data.train_manual_dir` (see toolr1_jax/data/qa.py);
  * a judge: any OpenAI-compatible server, e.g. `python -m toolr1_jax.serve --model=DIR --port=8000`
    or vLLM, at `reward.judge_url`;
  * optionally, for image and audio/video attachments, OpenAI-compatible servers of a
    vision-language model (`sandbox.vision_url`, `sandbox.vision_model`) and of a speech-to-text
    model (`sandbox.transcription_url`); without them those tools say they are off.

  python train.py --config=configs/gaia.py --workdir=/tmp/toolr1_gaia \
      --config.reward.judge_url=http://localhost:8000/v1 --config.reward.judge_model=judge

  python evaluate.py --config=configs/gaia.py --config.data.manual_dir=~/data/gaia \
      --model=~/models/qwen2.5-7b --split=validation --output_dir=/tmp/gaia_val
  (--split=test writes submission.jsonl for GAIA's leaderboard instead of an accuracy.)

Variants (`configs/gaia.py:VARIANT`):
  debug   the same code path on a tiny from-scratch model and the embedded synthetic GAIA-format
          suite, on CPU in about two minutes:
            python train.py --config=configs/gaia.py:debug --workdir=/tmp/toolr1_debug
          Given `--config.data.manual_dir=<GAIA folder>` it evaluates on GAIA instead of the
          synthetic suite (data.eval_name="auto"), e.g. with evaluate.py and a small model.
  14b     Qwen2.5-14B-Instruct on an FSDP x tensor mesh.
"""

from configs import common
from toolr1_jax.sandbox import worker

# GAIA's attachments include zip archives and xml files the policy may want to open itself.
_GAIA_IMPORTS = (*worker.DEFAULT_AUTHORIZED_IMPORTS, "zipfile", "xml")


def get_config(arg=None):
    args = common.parse_arg(arg, debug=False, **{"14b": False})
    c = common.base_config()
    c.seed = 0
    c.total_steps = 300

    # Policy.
    c.model = common.model_config("qwen2.5-14b" if args["14b"] else "qwen2.5-7b")
    c.model.init_from = "~/models/qwen2.5-14b" if args["14b"] else "~/models/qwen2.5-7b"
    c.model.dtype = "bfloat16"
    c.mesh = common.mesh_config("fsdp_tp" if args["14b"] else "fsdp")

    # Rollouts.
    c.engine.num_slots = 64
    c.engine.decode_chunk_steps = 32
    c.agent.max_turns = 10
    c.agent.max_total_tokens = 16384
    c.agent.max_new_tokens_per_turn = 1024
    c.agent.observation_max_chars = 4000
    c.agent.temperature = 1.0
    c.sandbox.num_workers = 16
    c.sandbox.timeout_s = 60.0
    c.sandbox.authorized_imports = _GAIA_IMPORTS

    # Reward: an LLM judge of the final answer, plus code execution and format terms.
    c.reward.judge = "openai"
    c.reward.judge_url = ""
    c.reward.judge_model = ""
    c.reward.w_answer = 1.0
    c.reward.w_exec = 0.1
    c.reward.w_format = 0.1

    # GRPO and the dynamic sample queue.
    c.grpo.questions_per_step = 32
    c.grpo.group_size = 8
    c.queue.enabled = True
    c.queue.per_question = 4
    c.queue.max_replay = 2
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.num_microbatches = 16

    # Data: GAIA (validation for evaluation; test for a leaderboard submission), and the user's
    # question set for training.
    c.data.name = "gaia"
    c.data.config = "2023_all"
    c.data.manual_dir = "~/data/gaia"
    c.data.eval_split = "validation"
    c.data.train_name = "qa"
    c.data.train_config = "default"
    c.data.train_manual_dir = "~/data/toolr1_train"
    c.data.train_split = "train"
    c.data.num_eval = 0

    c.ckpt.every_steps = 10
    c.log.eval_every_steps = 50

    if args.debug:
        c.total_steps = 3
        c.model = common.model_config("tiny")
        c.model.dtype = "float32"
        c.mesh = common.mesh_config("dp")
        c.engine.num_slots = 16
        c.engine.decode_chunk_steps = 16
        c.agent.system_prompt = common.COMPACT_SYSTEM_PROMPT
        c.agent.max_turns = 2
        c.agent.max_total_tokens = 768
        # The tiny tokenizer is trained mostly on the system prompt; since the prompt grew (tool
        # docs, imports), reference turns take 55-62 of its tokens, and at 48 only 7-24 of 64
        # demonstrations fit: SFT's policy then truncated every episode (multihost_test).
        c.agent.max_new_tokens_per_turn = 64
        c.sandbox.num_workers = 4
        c.sandbox.timeout_s = 10.0
        c.sandbox.memory_mb = 1024
        c.sandbox.search_corpus = "synthetic"
        c.sandbox.authorized_imports = ()  # the sandbox's default list, as before GAIA's
        c.reward.judge = "rule"
        c.grpo.questions_per_step = 4
        c.grpo.group_size = 4
        c.optim.lr = 1e-4
        c.optim.warmup_steps = 1
        c.optim.num_microbatches = 2
        c.data.name = "synthetic"
        c.data.config = ""  # the builder's default, so that data.name=gaia needs no other key
        c.data.manual_dir = ""
        c.data.train_name = ""
        c.data.train_config = ""
        c.data.train_manual_dir = ""
        c.data.eval_name = "auto"  # GAIA when data.manual_dir is given
        c.data.num_eval = 4
        c.ckpt.every_steps = 1
        c.log.eval_every_steps = 3
    return c
