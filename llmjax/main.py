"""Launch a training job: python -m llmjax.main --config=experiments/x.py[:arg] --workdir=DIR.

Override any key with --config.a.b=value (e.g. --config.train.steps=100). Rerunning the same
command resumes from the workdir's latest checkpoint. Exits 2 on bad input (one line).
"""

import sys

from llmjax import cli

FLAGS = cli.CONFIG_FLAGS


def main(argv: list[str]) -> int:
  return cli.run(_main, argv)


def _main(argv: list[str]) -> int:
  args = cli.parse(argv, FLAGS, prog='llmjax.main', doc=__doc__, overrides=True)
  config = cli.load_config(args)
  import os
  import jax
  # Multi-host TPU slice: every worker runs this same command (`llmjax.launch run` sets
  # LLMJAX_DISTRIBUTED=1); initialize() finds the other workers from the TPU metadata. It must
  # run before anything touches a JAX backend, so no jax.process_count() before it.
  if os.environ.get('LLMJAX_DISTRIBUTED') == '1' or 'TPU_WORKER_HOSTNAMES' in os.environ:
    jax.distributed.initialize()
  from llmjax.train import objectives
  if objectives.objective(config) in objectives.RL_OBJECTIVES:  # sample, score, update
    from llmjax.rl.loop import train_rl as run
  else:
    from llmjax.train.loop import train_and_evaluate as run
  result = run(config, args['workdir'])
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
