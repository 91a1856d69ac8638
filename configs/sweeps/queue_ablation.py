r"""The dynamic sample queue ablation on the embedded demo: does the queue reach the same eval
accuracy with fewer fresh (online) samples?

  python sweep.py --sweep=configs/sweeps/queue_ablation.py --workdir=/tmp/sweeps/queue
  python plot.py --workdir=/tmp/sweeps/queue --target=0.5

Arms (everything else is `configs/demo.py`):
  queue_on      replays cached successes and restores signal in zero-variance groups
  queue_off     plain GRPO: every episode fresh, questions in plain passes over the data
  replay_only   the queue without zero-variance restoration, to separate its two effects

Variants (`queue_ablation.py:VARIANT`): `tiny` (demo.py:tiny, a few steps: checks the sweep end
to end in minutes), `steps=N` (training steps per run; default 60, 4 with tiny).
"""

from configs import common


def get_sweep(arg=None):
    args = common.parse_arg(arg, tiny=False, steps=0)
    base = "configs/demo.py:" + ("tiny," if args.tiny else "")
    steps = args.steps or (4 if args.tiny else 60)
    # Frequent evals: the curves need several points, and eval time is not counted as wall time.
    shared = {"total_steps": steps, "log.eval_every_steps": 2 if args.tiny else 5}
    return [
        {"name": "queue_on", "config": f"{base}queue=true", "overrides": shared},
        {"name": "queue_off", "config": f"{base}queue=false", "overrides": shared},
        {
            "name": "replay_only",
            "config": f"{base}queue=true",
            "overrides": {**shared, "queue.restore_zero_variance": False},
        },
    ]
