# %% [markdown]
# # Scaling out with llmjax: meshes, logical-axis rules, sharded steps, `llmjax.plan`
#
# On a TPU v2-8 / v5e-8 runtime the mesh is the runtime's 8 chips; on a CPU runtime XLA
# emulates 8 devices (the cell below, which must run before JAX is imported). The same config
# keys (`mesh.*`, `sharding.rules`) lay a model out on a v5p-128.

# %%
# Before `import jax`: 8 emulated CPU devices (ignored by a TPU or GPU runtime's own devices).
import os
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()

# %% install

# %%
import jax

RUNTIME = jax.default_backend()  # 'tpu', 'gpu' or 'cpu'
print(f'{RUNTIME}: {jax.device_count()} device(s)')
for d in jax.devices():
  print(' ', d)
# Steps of the sharded run, and the job `llmjax.plan` compiles for a bigger slice: Llama 3 8B
# LoRA on a v5e-8 (about 2 minutes to compile on 2 CPU cores), in the test (CI) the tiny
# quickstart model on a v5e-16.
STEPS = 10 if TEST else 100
PLAN = (('experiments/quickstart.py', 'v5e:4x4') if TEST else
        ('experiments/sft.py:llama3-8b,lora=16', 'v5e:2x4'))

# %% [markdown]
# ## The mesh and the logical-axis rules
#
# Five named mesh axes (`llmjax.sharding`): `data`, `fsdp` (ZeRO-3), `sequence`, `expert`,
# `tensor` (Megatron). The layers name their dimensions logically (`embed`, `heads`, `mlp`,
# `vocab`, `batch`, ...); `sharding.rules` is one table from those names to mesh axes. Here:
# the devices as data x fsdp x tensor, with the `fsdp_tensor` rules.

# %%
from llmjax import config as config_lib
from llmjax import sharding

config = config_lib.load_config(f'experiments/quickstart.py:steps={STEPS}')
n = jax.device_count()
config.mesh.tensor = 2 if n % 2 == 0 else 1
config.mesh.fsdp = 2 if n % (2 * config.mesh.tensor) == 0 else 1
config.mesh.data = -1  # the rest
config.sharding.rules = 'fsdp_tensor'
mesh = sharding.make_mesh(config.mesh)
rules = sharding.rules_from_config(config)
print('mesh', dict(mesh.shape))
print(mesh.devices)
for logical, mesh_axes in rules:
  print(f'  {logical:10s} -> {mesh_axes}')

# %% [markdown]
# ## Where each parameter lives
#
# `make_trainer` builds the jitted train step and the train state's shardings from the rules
# (nothing is allocated yet: `abstract_state` holds shapes). Each weight's spec says which
# mesh axis splits each of its dimensions; its shard is what one device holds.

# %%
from llmjax.train.loop import make_trainer

model_cfg = config_lib.validate(config, data_files=False)
trainer = make_trainer(config, model_cfg, mesh, rules)
for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]:
  name = jax.tree_util.keystr(path, simple=True, separator='/')
  print(f'{name:40s} {str(leaf.shape):18s} {str(tuple(leaf.sharding.spec)):40s}'
        f' shard {leaf.sharding.shard_shape(leaf.shape)}')

# %% [markdown]
# ## A sharded train step
#
# `train_and_evaluate` on this mesh: the batch split over data x fsdp, the weights and Adam
# moments over fsdp and tensor, XLA inserting the collectives.

# %%
from llmjax.train.loop import train_and_evaluate

if TEST:  # short rows, one eval on one batch, no samples
  config.data.seq_len = 64
  config.train.eval_every = config.train.checkpoint_every = STEPS
  config.data.eval_batches = 1
  config.train.unigram_baseline_batches = 2
  config.sample.prompts = ()
result = train_and_evaluate(config, os.path.join(WORKDIRS, 'sharded'))
result

# %% [markdown]
# ## `llmjax.plan`: slices bigger than this runtime
#
# libtpu compiles a train step for a named TPU topology without its chips; `llmjax.plan`
# compiles exactly the step `llmjax.main` would run there and reports XLA's memory analysis
# per chip, the FLOPs and whether it fits. (It needs libtpu: `pip install 'jax[tpu]'` on a CPU
# runtime.) The command line is
#
#     JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m llmjax.plan \
#         --config=experiments/sft.py:llama3-8b,lora=16 --topology=v5e:2x4

# %%
from llmjax import plan

experiment, topology = PLAN
big = config_lib.load_config(experiment)
report, _ = plan.plan(big, topology)
print(plan.format_report(big, report))
