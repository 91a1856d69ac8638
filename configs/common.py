"""Shared config pieces: argument parsing for variants, model and mesh presets, the base config.

Every key the library reads is defined in `base_config()`; experiment files override values, never
add keys (ml_collections then rejects typos given on the command line).
"""

from __future__ import annotations

import ml_collections

# Architectures of the Hugging Face checkpoints we train from. When `model.init_from` points at a
# local directory its config.json is authoritative; the preset names the checkpoint to download
# and gives the shapes for from-scratch runs.
MODEL_PRESETS = {
    "tiny": dict(
        hf_repo="",
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        hf_repo="Qwen/Qwen2.5-0.5B-Instruct",
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hf_repo="Qwen/Qwen2.5-1.5B-Instruct",
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hf_repo="Qwen/Qwen2.5-7B-Instruct",
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        hf_repo="Qwen/Qwen2.5-14B-Instruct",
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
    "qwen3-4b": dict(
        hf_repo="Qwen/Qwen3-4B",
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hf_repo="Qwen/Qwen3-8B",
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
}

# A short code-agent prompt for small from-scratch models (debug runs, the demo): the default
# prompt in toolr1_jax/agent/prompt.py costs them too many tokens per episode.
COMPACT_SYSTEM_PROMPT = """\
Solve the task with Python. Each step: one line "Thought: ...", then code between <code> and \
</code>. What the code prints comes back after "Observation:". Variables persist between steps. \
Files are in the working directory. Tools:
{tool_signatures}
Imports: {authorized_imports}. When you know the answer, call final_answer(answer).
"""

# SmolLM2-135M-Instruct follows instructions in the user turn far more than in the system prompt
# (measured on 12 level-1 questions, greedy: 1/12 first turns held code with COMPACT_SYSTEM_PROMPT,
# 3/12 with the examples below, 12/12 with the examples plus SMOLLM2_TASK_TEMPLATE's reminder).
SMOLLM2_SYSTEM_PROMPT = """\
You solve tasks by writing Python code. Answer every message in exactly this format:
Thought: <one sentence>
<code>
<python code>
</code>
The code runs and its printed output comes back as "Observation:". Variables persist between \
steps. Files are in the working directory. Tools:
{tool_signatures}
Imports: {authorized_imports}.
Example:
Task: What is 12 * (3 + 4)?
Thought: I compute it with Python.
<code>
final_answer(12 * (3 + 4))
</code>
Example:
Task: How many rows in data.csv have color red?
Thought: I read the file with pandas and count.
<code>
import pandas as pd
df = pd.read_csv("data.csv")
print(len(df[df["color"] == "red"]))
</code>
When you know the answer, call final_answer(answer).
"""
SMOLLM2_TASK_TEMPLATE = (
    "Task: {question}{files}\nSolve it with Python: write a Thought: line, then code between "
    "<code> and </code>. Call final_answer(answer) in the code."
)

# (data, fsdp, tensor); -1 takes the remaining devices.
MESH_PRESETS = {
    "single": (1, 1, 1),
    "dp": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "fsdp_tp": (1, -1, 4),
}


def parse_arg(arg: str | None, **spec):
    """Parses `key=value,flag` (the part after `:` in `--config=configs/x.py:...`).

    `spec` gives each allowed key with its default; the default's type converts the value. A bare
    `flag` sets a bool key to True. Unknown keys raise, naming the allowed ones.
    """
    values = ml_collections.ConfigDict(dict(spec))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in spec:
            raise ValueError(
                f"Unknown config argument {key!r}; allowed: {', '.join(sorted(spec)) or 'none'}."
            )
        default = spec[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
            values[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config argument {key}={value!r} is not a bool.")
            values[key] = value.lower() in ("true", "1")
        elif default is None:
            values[key] = value
        else:
            values[key] = type(default)(value)
    return values


def model_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; known: {', '.join(MODEL_PRESETS)}.")
    c = ml_collections.ConfigDict(MODEL_PRESETS[preset])
    c.preset = preset
    c.init_from = ""  # local Hugging Face directory (config.json + *.safetensors)
    c.tokenizer = ""  # local tokenizer directory; defaults to init_from
    c.dtype = "bfloat16"
    return c


def mesh_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in MESH_PRESETS:
        raise ValueError(f"Unknown mesh preset {preset!r}; known: {', '.join(MESH_PRESETS)}.")
    data, fsdp, tensor = MESH_PRESETS[preset]
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with defaults for a single-host run."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100

    c.model = model_config("tiny")

    c.engine = ml_collections.ConfigDict()
    c.engine.num_slots = 64  # concurrent episodes per host
    # Slots one decode program computes (0 = all). Fewer rows than slots: an episode waiting on
    # its tool keeps its cache without taking a row (benchmarks/bench_rollout.py measures it).
    c.engine.decode_rows = 0
    c.engine.decode_chunk_steps = 32  # decode steps between host check-ins

    c.agent = ml_collections.ConfigDict()
    c.agent.system_prompt = ""  # "" = the default code-agent prompt in toolr1_jax/agent/prompt.py
    c.agent.task_template = ""  # "" = the default task message template
    c.agent.max_turns = 6
    c.agent.max_total_tokens = 4096  # tokens per episode (prompt + all turns)
    c.agent.max_new_tokens_per_turn = 512
    c.agent.observation_max_chars = 2000
    c.agent.episode_timeout_s = 600.0
    c.agent.temperature = 1.0
    c.agent.top_p = 1.0
    c.agent.top_k = 0
    # A turn stops after its code block; "\n```\n" closes a markdown block, the fallback format
    # instruction-tuned models write (configs/demo.py:smollm2 adds it).
    c.agent.stop_strings = ("</code>",)
    # The baseline the asynchronous rollout is measured against (bench_rollout.py, ablations):
    # no episode starts its next turn until every live episode's tool call is back.
    c.agent.lockstep = False
    # Derived, not a second setting: a slot holds one whole episode. (Setting either key sets
    # both: they are one ml_collections reference.)
    c.engine.max_len = c.agent.get_ref("max_total_tokens")

    c.sandbox = ml_collections.ConfigDict()
    c.sandbox.num_workers = 8  # programs executing at once
    c.sandbox.timeout_s = 30.0  # per code run
    c.sandbox.memory_mb = 2048
    c.sandbox.authorized_imports = ()  # module names; () = the sandbox's default list
    c.sandbox.search_corpus = ""  # "synthetic" = the synthetic suite's corpus; "" = no search tool
    c.sandbox.web_search_url = ""  # OpenAI-style web search backend; "" = web tools off
    c.sandbox.web_api_key_env = ""
    # Images and audio/video attachments go to OpenAI-compatible model servers (base URLs ending
    # in /v1): a vision-language chat model, and a speech-to-text /audio/transcriptions endpoint.
    # "" = that tool is off (the policy is told so when it opens such a file).
    c.sandbox.vision_url = ""
    c.sandbox.vision_model = ""
    c.sandbox.vision_api_key_env = ""  # environment variable holding the key; "" = no key
    c.sandbox.transcription_url = ""
    c.sandbox.transcription_model = "whisper-1"
    c.sandbox.transcription_api_key_env = ""
    c.sandbox.media_timeout_s = 120.0  # per request to either server

    c.reward = ml_collections.ConfigDict()
    c.reward.judge = "rule"  # rule | openai | local
    c.reward.judge_url = ""  # OpenAI-compatible base URL, e.g. http://host:8000/v1
    c.reward.judge_model = ""
    c.reward.judge_api_key_env = "OPENAI_API_KEY"
    c.reward.judge_timeout_s = 60.0
    c.reward.judge_max_concurrency = 32
    c.reward.w_answer = 1.0
    c.reward.w_exec = 0.1
    c.reward.w_format = 0.1
    c.reward.aux_requires_answer = True

    c.queue = ml_collections.ConfigDict()
    c.queue.enabled = True
    c.queue.per_question = 4  # K cached trajectories per question
    c.queue.threshold = 1.0  # minimum reward to be cached
    c.queue.max_replay = 2  # cached trajectories reused per group
    c.queue.max_staleness = 20  # policy versions before a cached trajectory expires
    c.queue.restore_zero_variance = True

    c.grpo = ml_collections.ConfigDict()
    c.grpo.questions_per_step = 8
    c.grpo.group_size = 8  # G episodes per question
    c.grpo.scale_advantages = True  # False = Dr. GRPO (r - mean)
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.28
    c.grpo.is_cap = 2.0  # truncation C of the behaviour importance weight
    c.grpo.beta = 0.0  # KL to the frozen reference (0 = no reference model)
    c.grpo.kl_estimator = "k3"
    c.grpo.aggregation = "seq_mean_token_sum_norm"
    c.grpo.drop_truncated = True  # mask episodes cut by token/turn limits
    c.grpo.updates_per_batch = 1

    c.sft = ml_collections.ConfigDict()
    c.sft.enabled = False  # cold-start SFT on the training set's reference solutions first
    c.sft.num_demos = 512  # training examples whose reference solutions are played
    c.sft.levels = ()  # demonstrations only from these levels (() = every level data.levels keeps)
    c.sft.num_steps = 200
    c.sft.batch_size = 16
    c.sft.lr = 1e-3
    c.sft.warmup_steps = 10

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.num_microbatches = 1
    # What the update's backward recomputes: block (least memory) | dots (keeps matmul outputs,
    # ~0.56 MB per token at SmolLM2's size, ~8% faster there) | none.
    c.optim.remat = "block"

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"  # synthetic | gaia | qa
    c.data.config = ""  # TFDS builder config name ("" = the builder's default)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.manual_dir = ""
    c.data.levels = ()  # levels to keep, e.g. (1, 2); () = all
    c.data.num_train = 0  # GRPO's questions: the first N training examples (0 = the whole split)
    # GRPO's questions only from these levels (() = every level data.levels keeps); SFT
    # demonstrations and evaluation are not filtered by it.
    c.data.grpo_levels = ()
    c.data.num_eval = 64  # eval examples (0 = the whole split)
    # Training or evaluation may read another dataset than data.name (e.g. train on a QA set,
    # evaluate on GAIA); the overrides take the same values as the data.* keys they replace.
    c.data.train_name = ""  # "" = data.name
    c.data.train_config = ""  # "" = data.config when train_name is "", else the builder's default
    c.data.train_manual_dir = ""  # "" = data.manual_dir
    # eval_name "auto": GAIA when a manual dir (eval_manual_dir or manual_dir) is given, else
    # data.name (the debug variants: the synthetic suite unless a GAIA folder is passed).
    c.data.eval_name = ""  # "" = data.name
    c.data.eval_config = ""  # "" = data.config when eval_name is "", else the builder's default
    c.data.eval_manual_dir = ""  # "" = data.manual_dir

    c.mesh = mesh_config("dp")

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = 10
    c.ckpt.max_to_keep = 3
    # Keep step 0 (the cold-start SFT result) past max_to_keep, to start GRPO runs from it
    # (`ckpt.resume_from=<workdir>/checkpoints/0`).
    c.ckpt.keep_sft = True
    c.ckpt.resume_from = ""
    c.ckpt.export_hf = True  # write a Hugging Face export at the end of training

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 1
    c.log.eval_every_steps = 20
    c.log.num_eval_samples = 1
    c.log.eval_temperature = 0.0  # 0 = greedy (pass@1); raise it for pass@k with k > 1
    c.log.progress_bar = True
    # Every GRPO step's episodes (fresh and replayed, with rewards) to rollouts/step_N.jsonl.
    c.log.save_rollouts = True

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize()
    c.distributed.coordinator_address = ""  # "" = auto-detect (TPU pods, SLURM)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c
