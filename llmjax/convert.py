"""Convert checkpoints between Hugging Face (transformers) and llmjax.

    python -m llmjax.convert --from=hf --src=HF_DIR --dst=DIR [--dtype=bfloat16]
                             [--peft=ADAPTER_DIR]
    python -m llmjax.convert --to=hf --src=DIR --dst=HF_DIR [--max_shard_bytes=5000000000]
                             [--architecture=LlamaForCausalLM] [--step=N]
    python -m llmjax.convert --to=peft --src=DIR --dst=ADAPTER_DIR [--base_model=NAME] [--step=N]
    python -m llmjax.convert --to=gguf --src=DIR --dst=FILE.gguf --gguf_type=f32|f16|q8_0|q4_0
                             [--gguf_pre=NAME] [--step=N]

`--from=hf` writes an llmjax workdir laid out as the training loop writes its own
(`llmjax.train.checkpoint`), so `--config.workdir=DIR`-style restores, `checkpoint.restore_params(DIR)`
and `python -m llmjax.generate --workdir=DIR` read it unchanged:

    DIR/model_config.json               dataclasses.asdict(ModelConfig)
    DIR/checkpoints/0/state/            Orbax StandardSave of {'params': params} (step 0)
    DIR/tokenizer.json | tokenizer.model, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja, generation_config.json     copied verbatim when present

The params are the model's pytree (`llmjax.models.init_params` layout: scanned layers stacked
under params['layers']). Restore them with
`ocp.args.Composite(state=ocp.args.StandardRestore({'params': abstract_params}))`, which
places them onto any shardings. `--to=hf` reads the latest step (or --step) of such a workdir,
including ones written by training (their 'state' holds 'params' among other things), and
picks the Hugging Face architecture from the model's features unless --architecture is given.
With `--peft`, the workdir is the LoRA model of that PEFT adapter over the base (rank, alpha
and targets from its adapter_config.json; the adapters unmerged, float32), which `generate`
and `--to=hf` merge, `--to=peft` writes back and `init.params_dir` fine-tunes from (merged).
`--to=peft` writes only a LoRA run's adapters, unmerged, as a PEFT adapter dir
(adapter_config.json + adapter_model.safetensors, `llmjax.interop.peft`) that
`peft.PeftModel.from_pretrained(base, ADAPTER_DIR)` loads over the run's Hugging Face base.
`--to=gguf` writes one file for llama.cpp and Ollama (Llama, Mistral, Qwen2; LoRA merged) by way
of the `--to=hf` export in a temporary dir (`llmjax.interop.gguf`); the architecture and type
are checked from model_config.json before any weight is read.
"""

import os
import sys

from llmjax import cli, files
from llmjax.errors import UserError

FLAGS = (
    cli.Flag('from', '', "'hf': convert a Hugging Face checkpoint dir (--src) into an llmjax"
             ' workdir (--dst)', metavar='hf'),
    cli.Flag('to', '', "'hf': convert an llmjax workdir (--src) into a Hugging Face checkpoint"
             " dir (--dst); 'peft': a LoRA workdir's adapters into a PEFT adapter dir; 'gguf': a"
             " workdir into one .gguf file for llama.cpp (--dst=FILE.gguf)",
             metavar='hf|peft|gguf'),
    cli.Flag('src', '', 'the directory to read (local or gs://)', metavar='DIR'),
    cli.Flag('dst', '', 'the directory to write (local or gs://; --from=hf: must not hold'
             ' checkpoints yet)', metavar='DIR'),
    cli.Flag('dtype', '', "--from=hf: store and compute in this dtype (e.g. bfloat16); '': the"
             " checkpoint's own", metavar='DTYPE'),
    cli.Flag('max_shard_bytes', 5 * 10**9, '--to=hf: the largest safetensors file'),
    cli.Flag('architecture', '', "--to=hf: the transformers class (e.g. LlamaForCausalLM); '':"
             " picked from the model's features", metavar='NAME'),
    cli.Flag('peft', '', '--from=hf: a PEFT LoRA adapter dir over --src, imported with it',
             metavar='ADAPTER_DIR'),
    cli.Flag('step', -1, '--to=hf/peft/gguf: the checkpoint step to export; -1: the latest'),
    cli.Flag('gguf_type', 'f16', "--to=gguf: the matrices' type (norms and biases stay float32)",
             metavar='f32|f16|q8_0|q4_0'),
    cli.Flag('gguf_pre', '', "--to=gguf: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for"
             " a BPE tokenizer whose regex llmjax does not know; '': read from tokenizer.json",
             metavar='NAME'),
    cli.Flag('base_model', '', "--to=peft: adapter_config.json's base_model_name_or_path (the"
             " base's hub id or dir); '': none recorded", metavar='NAME'),
)


def parse_flags(argv: list[str]) -> dict:
  """argv -> {flag: value}; a missing direction or directory is a one-line UserError."""
  flags = cli.parse(argv, FLAGS, prog='llmjax.convert', doc=__doc__)
  if (flags['from'], flags['to']) not in (('hf', ''), ('', 'hf'), ('', 'peft'), ('', 'gguf')):
    raise UserError("pass --from=hf (Hugging Face -> llmjax), --to=hf (llmjax -> Hugging Face),"
                    " --to=peft (a LoRA run's adapters -> PEFT) or --to=gguf (-> llama.cpp).")
  if not flags['src'] or not flags['dst']:
    raise UserError("pass --src=DIR and --dst=DIR.")
  if flags['peft'] and not flags['from']:
    raise UserError("--peft=DIR imports an adapter with --from=hf; to export a LoRA run's"
                    " adapters use --to=peft.")
  return flags


def from_hf(src: str, dst: str, dtype: str = '', peft_dir: str = '') -> None:
  """Hugging Face dir (and a PEFT adapter over it) -> llmjax workdir (layout in the module
  docstring)."""
  from llmjax.interop import load_hf
  from llmjax.interop.tokenizer import TOKENIZER_FILES
  from llmjax.train import checkpoint
  if files.isdir(checkpoint.checkpoint_dir(dst)):  # before any weight is read
    raise UserError(f"{dst}/checkpoints already exists; pass a new --dst.")
  if peft_dir:
    from llmjax.interop import peft
    cfg, params, _ = peft.load_hf_with_adapter(src, peft_dir, '--peft', dtype=dtype or None)
  else:
    overrides = {'dtype': dtype, 'param_dtype': dtype} if dtype else {}
    cfg, params, _ = load_hf(src, **overrides)
  checkpoint.write_params_workdir(dst, cfg, params)
  for name in TOKENIZER_FILES:
    if files.exists(files.join(src, name)):
      files.copy_file(files.join(src, name), files.join(dst, name))
  if cfg.virtual_tokens:
    adapters = f" + {cfg.num_virtual_tokens} {cfg.virtual_tokens}-tuning tokens from {peft_dir}"
  else:
    adapters = (f" + {cfg.num_lora_params:,} adapter params (r={cfg.lora_rank}) from {peft_dir}"
                if peft_dir else '')
  print(f"wrote {dst}: {cfg.num_params:,} params ({cfg.param_dtype}){adapters}, step 0")


def _restore(src: str, step: int):
  """(ModelConfig, restored state dict, step) of checkpoint `step` (-1: latest) in `src`."""
  import orbax.checkpoint as ocp

  from llmjax.errors import CheckpointError
  from llmjax.train import checkpoint
  cfg = checkpoint.read_model_config(src)
  manager = checkpoint.make_manager(src, max_to_keep=1, async_save=False)
  step = manager.latest_step() if step < 0 else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(src)}; convert or train"
                          " into it first.")
  if step not in manager.all_steps():
    raise CheckpointError(f"--step={step}: no such checkpoint in {checkpoint.checkpoint_dir(src)};"
                          f" it has steps {sorted(manager.all_steps())}.")
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"checkpoint step {step} in {checkpoint.checkpoint_dir(src)} could not be"
                          f" restored ({str(e).splitlines()[0][:200]}); it may be incomplete:"
                          " pass an earlier --step.") from None
  manager.close()
  return cfg, state['state'], step


def to_hf(src: str, dst: str, *, max_shard_bytes: int, architecture: str = '',
          step: int = -1) -> None:
  """llmjax workdir -> Hugging Face dir."""
  from llmjax.interop import save_hf
  from llmjax.interop.tokenizer import TOKENIZER_READ_FILES
  cfg, state, step = _restore(src, step)
  from llmjax.models import lora
  params, cfg = lora.merge(state['params'], cfg)  # transformers has no adapters: fold them in
  # The run's tokenizer: a checkpoint's copied to WORKDIR/hf_tokenizer by init.hf_dir, else
  # the workdir's own files (convert --from=hf puts them there).
  from llmjax.data.chat import RUN_TEMPLATE
  from llmjax.data.pipeline import HF_TOKENIZER_DIR
  run_tokenizer = files.join(src, HF_TOKENIZER_DIR)
  if not files.isdir(run_tokenizer):
    run_tokenizer = src
  # save_hf reads the tokenizer files with local calls: a gs:// workdir's come via a temp dir.
  with files.download_dir(run_tokenizer, TOKENIZER_READ_FILES) as tokenizer_dir:
    written = save_hf(dst, cfg, params, tokenizer_dir=tokenizer_dir,
                      architecture=architecture or None, max_shard_bytes=max_shard_bytes)
  if run_tokenizer != src and files.exists(files.join(src, RUN_TEMPLATE)):
    # A run tuned with its own data.chat_template: that is the template its model now follows.
    files.copy_file(files.join(src, RUN_TEMPLATE), files.join(dst, RUN_TEMPLATE))
  print(f"wrote {dst}: {len(written)} safetensors file(s) from step {step}")


def to_peft(src: str, dst: str, *, step: int = -1, base_model: str = '') -> None:
  """A LoRA workdir's adapters (unmerged), or a prompt- or prefix-tuning workdir's virtual
  tokens -> PEFT adapter dir."""
  from llmjax.interop import peft
  from llmjax.train import checkpoint
  cfg = checkpoint.read_model_config(src)
  if cfg.virtual_tokens:  # PEFT's PROMPT_TUNING / PREFIX_TUNING format: one tensor
    if files.is_remote(dst):  # safetensors writes local files only
      raise UserError(f"--dst={dst} is not on local disk; write the adapter to a local dir,"
                      " then copy it (gcloud storage cp -r).")
    cfg, state, step = _restore(src, step)
    save = peft.save_prompt_tuning if cfg.virtual_tokens == 'prompt' else peft.save_prefix_tuning
    n = save(dst, cfg, state['params'], base_model=base_model or None)
    print(f"wrote {dst}: {n:,} {cfg.virtual_tokens}-tuning params ({cfg.num_virtual_tokens}"
          f" virtual tokens) from step {step}")
    return
  if not cfg.lora_rank:  # said before anything is restored
    raise UserError(f"{src} is not a LoRA run (model.lora_rank=0 in its model_config.json): it"
                    " has no adapters; export the whole model with --to=hf.")
  peft.check_rank(peft.peft_family(cfg), cfg, f'{src}/model_config.json')
  if files.is_remote(dst):  # safetensors writes local files only
    raise UserError(f"--dst={dst} is not on local disk; write the adapter to a local dir, then"
                    " copy it (gcloud storage cp -r).")
  cfg, state, step = _restore(src, step)
  n = peft.save_peft(dst, cfg, state['params'], base_model=base_model or None)
  print(f"wrote {dst}: {n:,} adapter params (r={cfg.lora_rank}, alpha={cfg.lora_alpha}) from"
        f" step {step}")


def to_gguf(src: str, dst: str, *, gguf_type: str, pre: str = '', step: int = -1) -> None:
  """llmjax workdir -> one .gguf file (by way of a temporary Hugging Face export)."""
  import tempfile

  from llmjax.interop import gguf
  from llmjax.train import checkpoint
  cfg = checkpoint.read_model_config(src)
  gguf.check_exportable(cfg, gguf_type, f'{src}/model_config.json')  # before any weight is read
  if files.is_remote(dst) or not dst.endswith('.gguf'):
    raise UserError(f"--dst={dst}: pass a local file name ending in .gguf (copy it to a bucket"
                    " afterwards).")
  if os.path.isdir(dst):
    raise UserError(f"--dst={dst} is a directory; pass a file name ending in .gguf.")
  parent = os.path.dirname(os.path.abspath(dst))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=parent, prefix='.gguf-hf-') as hf_dir:
    to_hf(src, hf_dir, max_shard_bytes=5 * 10**9, step=step)
    out = gguf.hf_to_gguf(hf_dir, dst, gguf_type, pre=pre,
                          name=os.path.basename(os.path.normpath(src)))
  print(f"wrote {dst}: arch {out['arch']}, {out['tensors']} tensors, {gguf_type},"
        f" {out['bytes']:,} bytes")


def main(argv: list[str]) -> int:
  return cli.run(_main, argv, error_code=1)


def _main(argv: list[str]) -> int:
  flags = parse_flags(argv)
  if flags['from']:
    from_hf(flags['src'], flags['dst'], flags['dtype'], flags['peft'])
  elif flags['to'] == 'gguf':
    to_gguf(flags['src'], flags['dst'], gguf_type=flags['gguf_type'], pre=flags['gguf_pre'],
            step=flags['step'])
  elif flags['to'] == 'peft':
    to_peft(flags['src'], flags['dst'], step=flags['step'], base_model=flags['base_model'])
  else:
    to_hf(flags['src'], flags['dst'], max_shard_bytes=flags['max_shard_bytes'],
          architecture=flags['architecture'], step=flags['step'])
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
