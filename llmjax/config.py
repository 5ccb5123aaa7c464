"""Experiment configs: loading `experiments/x.py:arg`, command-line overrides, validation.

An experiment file defines `get_config(arg: str) -> ml_collections.ConfigDict`. The CLI spells
it `--config=experiments/pretrain.py:model=llama3-1b,steps=10` and overrides single keys with
`--config.train.steps=100`. Everything is checked here, before any array is allocated, and each
problem is one line that names the key and the fix.
"""

import ast
import dataclasses
import importlib.util
import os

import ml_collections

from llmjax import files
from llmjax.errors import ConfigError, closest
from llmjax.models.config import RUNTIME_FIELDS, ModelConfig, get_preset


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=tiny,steps=10' -> ConfigDict(model='tiny', steps=10) over `defaults`.

  Values are parsed as Python literals where possible, else kept as strings, and must have the
  type of their default (an int will do for a float); unknown names are rejected so a typo in
  the `:arg` part fails loudly.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep:
      raise ConfigError(f"config argument '{item}' is not key=value; write e.g. 'model=tiny'.")
    if key not in defaults:
      raise ConfigError(f"config argument '{key}' is unknown.{closest(key, defaults)}"
                        f" Known: {', '.join(defaults)}.")
    try:
      out[key] = _typed(value.strip(), defaults[key])
    except ValueError as e:
      raise ConfigError(f"config argument {key}={value.strip()}: {e}; the default is"
                        f" {defaults[key]!r}.") from None
  return out


def split_variant(arg: str | None, variants) -> tuple[str, str]:
  """'llama3-8b,lora=16' -> ('llama3-8b', 'lora=16'): a leading item without '=' names one of
  `variants`; ('', arg) when there is none.

  Separate from `parse_arg` because a variant usually brings its own defaults, which must be
  known before the key=value items are typed against them:
      name, rest = split_variant(arg, VARIANTS); a = parse_arg(rest, **defaults_of(name)).
  An unknown name, or a variant name after a key=value item, is a one-line ConfigError.
  """
  items = [item.strip() for item in (arg or '').split(',') if item.strip()]
  for i, item in enumerate(items):
    if '=' in item:
      continue
    if i > 0:
      where = (f"; put it first: ':{item},{','.join(items[:i] + items[i + 1:])}'"
               if item in variants else "; only the first item may name a variant")
      raise ConfigError(f"config argument '{item}' is not key=value{where}.")
    if item not in variants:
      raise ConfigError(f"config variant '{item}' is unknown.{closest(item, variants)}"
                        f" Variants: {', '.join(variants)}.")
  if items and '=' not in items[0]:
    return items[0], ','.join(items[1:])
  return '', ','.join(items)


def _literal(text: str, kind: type):
  """`text` as a value of `kind`: str kept, bool from true/false/1/0/yes/no, else a literal.

  Raises ValueError for a bool that is none of those; other text that is no Python literal
  comes back as the string, for the caller's type check.
  """
  if kind is str:
    return text
  if kind is bool:
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f"'{text}' is not a boolean (true or false)")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  if kind is float and isinstance(value, int):
    value = float(value)
  return value


def _typed(text: str, current):
  """`text` parsed as the type of `current` (anything when it is None); ValueError if not.

  A tuple or list also takes bare comma-separated words ('arithmetic,facts'), so a list of
  names needs no Python quoting in a shell.
  """
  if current is None:
    return _literal(text, object)
  value = _literal(text, type(current))
  if isinstance(current, (tuple, list)) and isinstance(value, str):
    value = type(current)(w.strip() for w in value.split(',') if w.strip())
  if not isinstance(value, type(current)) and not (
      isinstance(current, float) and isinstance(value, int)):
    raise ValueError(f"expected {type(current).__name__}")
  return value


def model_config_dict(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A preset as a ConfigDict (every ModelConfig field, plus `preset`), for `config.model`."""
  cfg = get_preset(preset, **overrides)
  d = ml_collections.ConfigDict(dataclasses.asdict(cfg))
  if cfg.head_dim * cfg.num_heads == cfg.embed_dim:
    d.head_dim = 0  # derived from embed_dim // num_heads, so overriding num_heads alone works
  d.preset = preset
  return d


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/experiment.py[:arg]' by calling its get_config(arg)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f"--config: file '{path}' does not exist; pass e.g."
                      " --config=experiments/quickstart.py.")
  name = 'llmjax_experiment_' + os.path.splitext(os.path.basename(path))[0].replace('-', '_')
  spec_ = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f"--config: {path} has no get_config(arg) function.")
  return module.get_config(arg or None)


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets config.a.b = text parsed to the type of the current value; typos name the closest key."""
  node = config
  parts = dotted.split('.')
  for i, part in enumerate(parts):
    keys = list(node.keys())
    if part not in keys:
      where = '.'.join(parts[:i]) or 'config'
      raise ConfigError(f"--config.{dotted}: '{part}' is not a key of {where}.{closest(part, keys)}"
                        f" Keys there: {', '.join(sorted(keys))}.")
    if i < len(parts) - 1:
      node = node[part]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{dotted}: {'.'.join(parts[:i + 1])} is not a group of keys.")
  current = node[parts[-1]]
  try:
    value = _typed(text, current)
  except ValueError as e:
    raise ConfigError(f"--config.{dotted}={text}: {e}; the current value is {current!r}.") from None
  node[parts[-1]] = value


def parse_cli(argv: list[str], *, need_workdir: bool = True):
  """argv -> (config, workdir, other flags as {name: text}), as llmjax.main parses it.

  A thin wrapper over `llmjax.cli` (which the CLIs use directly): --config.x.y overrides are
  applied in order; flags other than --config and --workdir are returned, not refused.
  """
  from llmjax import cli
  rest = {}
  args = cli.parse(argv, cli.CONFIG_FLAGS, prog='llmjax.main', overrides=True, unknown=rest)
  return cli.load_config(args, need_workdir=need_workdir), args['workdir'] or None, rest


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1,
             data_files: bool = True, platform: str | None = None) -> ModelConfig:
  """Checks the whole config before anything compiles; returns the ModelConfig.

  data_files=False skips the checks that need the data (data.path, data.tokenizer_path) to be
  given and to exist on this machine: `llmjax.plan` compiles the step where they are not.
  platform: where the step will run ('cpu', 'gpu', 'tpu'), for model.attention's kernel;
  default `jax.default_backend()` (`llmjax.plan` passes 'tpu').
  """
  model = peft_model_config(config, ModelConfig.from_dict(config.model))
  if model.base_quant and not model.lora_rank:  # the quantized leaves take no gradient
    raise ConfigError(f"model.base_quant={model.base_quant!r} but model.lora_rank=0: QLoRA"
                      " trains adapters over a frozen quantized base; set model.lora_rank > 0"
                      " or model.base_quant='' (a quantized model for inference comes from"
                      " python -m llmjax.quantize).")
  t = config.train
  for key in ('steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every', 'grad_accum'):
    if int(t[key]) <= 0:
      raise ConfigError(f"train.{key}={t[key]} must be positive.")
  chunk = t.get('loss_chunk', 0)
  if chunk < 0 or (chunk and config.data.seq_len % chunk):
    raise ConfigError(f"train.loss_chunk={chunk} must be 0 (off) or a positive divisor of"
                      f" data.seq_len={config.data.seq_len}.")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum="
                      f"{t.grad_accum}; pick a divisor.")
  if config.data.seq_len > model.max_seq_len and model.position == 'learned':
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
                      f"{model.max_seq_len} (learned positions); lower data.seq_len.")
  if (config.data.seq_len + model.num_virtual_tokens > model.max_seq_len
      and model.position == 'learned'):  # the tokens sit at positions V..V + seq_len - 1
    raise ConfigError(f"data.seq_len={config.data.seq_len} + peft.num_virtual_tokens="
                      f"{model.num_virtual_tokens} exceeds model.max_seq_len="
                      f"{model.max_seq_len} (learned positions); lower one of them.")
  from llmjax.data import sources  # imported here: `llmjax.data` pulls in Grain
  sources.check_data_format(config.data, data_files=data_files)
  if config.data.get('builtin_tasks', ()) and len(config.data.get('builtin_weights', ())):
    from llmjax.data import tasks  # the names were checked with the format
    tasks.check_weights(tuple(config.data.builtin_tasks), config.data.builtin_weights)
  elif len(config.data.get('builtin_weights', ())):
    raise ConfigError(f"data.builtin_weights={tuple(config.data.builtin_weights)} but"
                      " data.builtin_tasks is empty; the weights mix built-in tasks, so set"
                      " data.builtin_tasks or drop the weights.")
  from llmjax.data.tokenizer import TOKENIZER_TYPES
  kind = config.data.get('tokenizer_type', 'bpe')
  if kind not in TOKENIZER_TYPES:
    raise ConfigError(f"data.tokenizer_type='{kind}' is not one of {list(TOKENIZER_TYPES)}."
                      f"{closest(kind, TOKENIZER_TYPES)}")
  path = config.data.get('path', '') if data_files else ''
  if path:
    import glob
    files.check_local('data.path', path)
    if not glob.glob(path):
      raise ConfigError(f"data.path='{path}' matches no file; pass an existing .txt/.jsonl file"
                        " or glob, or '' for the embedded corpus.")
  template = config.data.get('chat_template', '') if data_files else ''
  if template:
    from llmjax.data import chat  # a shipped template's name, or a .jinja file
    chat.check_template(template)
    if config.data.get('format', 'text') == 'messages':  # said before a tokenizer is trained
      chat.check_assistant_marker(*chat.template_source(template))
  tok = config.data.get('tokenizer_path', '') if data_files else ''
  if tok and not files.exists(tok):  # a sentencepiece .model may be on gs://
    raise ConfigError(f"data.tokenizer_path='{tok}' does not exist; pass a sentencepiece .model,"
                      " a Hugging Face checkpoint dir, or '' to train one into the workdir.")
  from llmjax.eval import suite  # eval.tasks parsed and its files found, nothing read yet
  suite.specs_from_config(config, data_files=data_files)
  init = config.get('init', {})
  if init.get('hf_dir') and init.get('params_dir'):
    raise ConfigError(f"init.hf_dir='{init.hf_dir}' and init.params_dir='{init.params_dir}' are"
                      " both set; start from one of them.")
  hf_tokenizer = config.data.get('tokenizer_path', '') or init.get('hf_dir', '')
  if (data_files and config.data.get('format', 'text') == 'messages' and not template
      and not (hf_tokenizer and files.isdir(hf_tokenizer))):
    from llmjax.data import chat  # only an HF checkpoint dir can carry a template
    raise ConfigError(chat.NO_TEMPLATE)
  if init.get('hf_dir'):
    from llmjax.interop import hf  # reads only config.json: cheap, and before any compile
    if config.model.get('preset'):  # the experiment pins an architecture: it must be this one
      hf.check_matches(init.hf_dir, model)
    else:  # the checkpoint's architecture; the experiment says only how to run it
      theirs = hf.config_from_hf(hf.read_hf_config(init.hf_dir), f"{init.hf_dir}/config.json",
                                 **{f: getattr(model, f) for f in RUNTIME_FIELDS})
      # ... and its head: a reward experiment (model.head='score') may start from an LM.
      hf.check_matches(init.hf_dir, dataclasses.replace(theirs, head=model.head))
      model = dataclasses.replace(theirs, head=model.head)
  if init.get('params_dir') and not config.model.get('preset'):
    # As from a config.json above: the run's architecture, the experiment's way to run it.
    from llmjax.train import checkpoint  # reads model_config.json only
    if files.exists(files.join(init.params_dir, 'model_config.json')):
      theirs = checkpoint.read_model_config(init.params_dir)
      model = dataclasses.replace(theirs, head=model.head,
                                  **{f: getattr(model, f) for f in RUNTIME_FIELDS})
  if init.get('peft_dir'):
    if not init.get('hf_dir'):
      raise ConfigError(f"init.peft_dir='{init.peft_dir}' needs init.hf_dir: set it to the"
                        " adapter's base model (a Hugging Face checkpoint dir).")
    files.check_local('init.peft_dir', init.peft_dir)
    from llmjax.interop import peft  # adapter_config.json and the safetensors header only
    peft.check_adapter(init.peft_dir, model)
  from llmjax.train import objectives  # the loss fits the data and the model
  objectives.check(config, model)
  if config.get('eval', {}).get('full_split', False) and objectives.objective(config) != 'lm':
    raise ConfigError(f"eval.full_split=True scores a language model's validation split; this"
                      f" run's train.objective is '{objectives.objective(config)}': set"
                      " eval.full_split=False.")
  dpo = config.get('dpo', {})
  if dpo.get('ref_hf_dir'):
    from llmjax.interop import hf  # the reference runs the policy's program: same architecture
    hf.check_matches(dpo.ref_hf_dir, model, key='dpo.ref_hf_dir')
  if dpo.get('ref_params_dir'):
    from llmjax.train import checkpoint, state
    state.check_params_dir(dpo.ref_params_dir, model)
    checkpoint.latest_step(dpo.ref_params_dir)
  if init.get('params_dir'):
    from llmjax.train import checkpoint, state  # model_config.json and the step list only
    if not files.exists(files.join(init.params_dir, 'model_config.json')):
      raise ConfigError(f"init.params_dir='{init.params_dir}' is not an llmjax workdir (it has"
                        " no model_config.json); run the training that writes it first, or"
                        " point init.params_dir at a run's --workdir.")
    state.check_params_dir(init.params_dir, model)
    checkpoint.latest_step(init.params_dir)
  if 'sample' in config:
    from llmjax.infer import sampler
    sampler.sample_params(config.sample)  # an out-of-range sample.* value, before training
  import jax
  from llmjax.kernels import dispatch  # the attention kernel's own limits, known before tracing
  dispatch.check_config(model, platform or jax.default_backend())
  return model


# peft.method -> model.virtual_tokens: the prompt-learning methods, whose settings the model
# needs (LoRA and DoRA are the model.lora_* keys).
PEFT_METHODS = {'': '', 'prompt_tuning': 'prompt', 'prefix_tuning': 'prefix'}


def peft_model_config(config: ml_collections.ConfigDict, model: ModelConfig) -> ModelConfig:
  """`model` with config.peft mirrored into it (model.virtual_tokens, num_virtual_tokens),
  validated; `model` itself without a peft.method. The one place the peft keys reach the model:
  `validate` returns this config, and the checkpoint's model_config.json records it."""
  peft = config.get('peft', {})
  method, n = peft.get('method', ''), peft.get('num_virtual_tokens', 0)
  if method not in PEFT_METHODS:
    raise ConfigError(f"peft.method='{method}' is unknown.{closest(method, PEFT_METHODS)}"
                      f" Choose one of {list(PEFT_METHODS)} (LoRA: model.lora_rank).")
  if peft.get('prompt_init_text') and method != 'prompt_tuning':
    raise ConfigError(f"peft.prompt_init_text is set but peft.method='{method}'; it initialises"
                      " prompt tuning only: set peft.method='prompt_tuning' or drop it.")
  if not method:
    if n:
      raise ConfigError(f"peft.num_virtual_tokens={n} but peft.method=''; set peft.method to"
                        " 'prompt_tuning' or 'prefix_tuning', or drop it.")
    return model
  if n <= 0:
    raise ConfigError(f"peft.num_virtual_tokens={n} must be > 0 with peft.method='{method}';"
                      " PEFT's examples use 8 to 20.")
  if config.train.get('objective', 'lm') == 'dpo':
    # Its reference model would need the virtual tokens switched off (as `lora.disable` does
    # for LoRA); not built yet.
    raise ConfigError(f"peft.method='{method}' with train.objective='dpo' is not supported;"
                      " use LoRA (model.lora_rank) for DPO, or train.objective='lm'.")
  out = dataclasses.replace(model, virtual_tokens=PEFT_METHODS[method], num_virtual_tokens=n)
  out.validate()
  return out


def base_config(model: str | None = None, **model_overrides) -> ml_collections.ConfigDict:
  """Every key a training job reads, with defaults. Experiment files start from this.

  model: a preset name (`llmjax.models.config.PRESETS`), which pins the architecture: with
  init.hf_dir the checkpoint must then be that model. None: the `tiny` preset's fields with
  model.preset='' (unpinned), so init.hf_dir takes the architecture from its config.json and
  the experiment supplies only dtypes, remat, attention and LoRA settings.
  """
  c = ml_collections.ConfigDict()
  c.model = model_config_dict(model or 'tiny', **model_overrides)
  if model is None:
    c.model.preset = ''

  c.data = ml_collections.ConfigDict()
  c.data.path = ''  # local .txt/.jsonl file or glob; '' = the embedded generated corpus
  c.data.tfds_name = ''  # a TFDS catalog name instead (needs network the first time)
  # What one document is (llmjax.data.sources.DATA_FORMATS): 'text' = pretraining on documents
  # from data.text_key; 'prompt_completion' = SFT on JSONL records {"prompt", "completion"}
  # (TRL's field names), loss on the completion tokens and EOS only; 'messages' = chat SFT on
  # JSONL records {"messages": [{"role", "content"}, ...]} (TRL's and the HF Hub's
  # conversational format) rendered by the chat template, loss on the assistant turns (and
  # their end-of-turn tokens) only, or as data.loss_on says; 'alpaca' = SFT on JSONL records
  # {"instruction", "input", "output"} (Stanford Alpaca's), the prompt rendered with Alpaca's
  # template (sources.ALPACA_PROMPT_INPUT, or _NO_INPUT when the input is ''), loss on the
  # output and EOS only. The SFT formats need data.path. An example whose answer starts past
  # data.seq_len is dropped, and the count logged.
  c.data.format = 'text'
  c.data.text_key = 'text'  # JSONL field holding the document
  c.data.prompt_key = 'prompt'  # JSONL fields of a prompt_completion record
  c.data.completion_key = 'completion'
  c.data.instruction_key = 'instruction'  # JSONL fields of an alpaca record (all required;
  c.data.input_key = 'input'  # the input may be '', which selects the template without it)
  c.data.output_key = 'output'
  c.data.messages_key = 'messages'  # JSONL field holding a conversation's list of messages
  # Preference data (llmjax.data.preference): 'preference' records {prompt_key, chosen_key,
  # rejected_key} (no prompt: implicit, the common prefix), 'unpaired_preference' (KTO) records
  # {prompt_key, completion_key, label_key: true|false}; strings or lists of messages.
  c.data.chosen_key = 'chosen'
  c.data.rejected_key = 'rejected'
  c.data.label_key = 'label'
  # Whole preference pairs per row (segments 2k+1 chosen, 2k+2 rejected): 1 = one pair per row,
  # as TRL batches, so train.batch_size counts pairs; > 1 packs pairs first fit into rows of
  # data.seq_len (fewer padding tokens) and train.batch_size counts rows. Each sequence of a
  # pair is cut to data.seq_len // 2 tokens (TRL's max_length).
  c.data.pairs_per_row = 1
  # For 'messages', what is trained on (sources.LOSS_ON): 'assistant' = every assistant turn;
  # 'last_assistant' = the final one only (earlier turns are context); 'all' = every token of
  # the rendered conversation, role headers and template markup included.
  c.data.loss_on = 'assistant'
  # For 'messages': a shipped template ('chatml', 'llama3', 'qwen2.5') or a .jinja file; '' =
  # the tokenizer's own (an HF checkpoint's), which a trained tokenizer never has: use 'chatml'.
  c.data.chat_template = ''
  c.data.seq_len = 256  # tokens per packed row
  c.data.tokenizer_path = ''  # a sentencepiece .model; '' = train one into WORKDIR/tokenizer.model
  c.data.vocab_size = 8192  # size of a trained tokenizer
  # 'bpe' or 'unigram' (a trained sentencepiece model), or 'char': the characters of the train
  # split are the tokens (llmjax.data.tokenizer.CharTokenizer; no BOS/EOS, unseen characters
  # are an error), for character-level LMs on plain text.
  c.data.tokenizer_type = 'bpe'
  # How data.path becomes train/validation (llmjax.data.sources.SPLITS): 'documents' = every
  # 20th document held out; 'tail' = the .txt files as one text, its last data.val_fraction of
  # characters held out (nanoGPT's split), both cut into windows of data.seq_len + 1 chars.
  c.data.split = 'documents'
  c.data.val_fraction = 0.1
  c.data.eval_batches = 8  # batches of the validation split per evaluation
  # Built-in instruction tasks to train on instead of data.path (llmjax.data.tasks: 'arithmetic',
  # 'facts', 'strings', 'format'), with data.format='prompt_completion' or 'messages': their
  # train splits are the data, their held-out splits the eval_loss, and every eval also scores
  # exact match on each held-out split (eval_<task>_exact_match). On the command line:
  # --config.data.builtin_tasks=arithmetic,facts.
  c.data.builtin_tasks = ()
  # One weight a task, each task's share of the train data (a small task is cycled, never a
  # large one cut: llmjax.data.tasks.mixture_counts); () trains each train split once, so a
  # task of 379 examples beside one of 10,000 is 4% of every batch.
  c.data.builtin_weights = ()
  c.data.builtin_seed = 0  # which problems are held out; apart from train.seed, so a sweep
  # over train.seed is scored on the same held-out questions

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # global, across all hosts and devices
  c.train.grad_accum = 1  # micro-batches per step: same update, 1/grad_accum of the activations
  # >0: the loss applies the LM head to this many positions at a time (must divide
  # data.seq_len), so the [batch, seq_len, vocab] float32 logits never exist at once; 0: whole.
  c.train.loss_chunk = 0
  # What the run optimises (llmjax.train.objectives): 'lm' = next-token loss (pretraining, SFT);
  # 'dpo' = the DPO family (dpo.*) on data.format='preference' (KTO: 'unpaired_preference');
  # 'reward' = a Bradley-Terry reward model (model.head='score') on 'preference' pairs;
  # 'grpo' / 'rloo' / 'ppo' = online RL (rl.*) from prompts and reward functions (llmjax/rl;
  # 'ppo' also needs model.value_head=True, its critic).
  c.train.objective = 'lm'
  c.train.seed = 0  # initialisation and data order
  c.train.lr = 3e-4
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio (Chinchilla, Hoffmann et al.)
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95  # 0.95 rather than 0.999: steadier for LLMs (GPT-3, Llama)
  c.train.grad_clip = 1.0  # global-norm clipping
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.max_to_keep = 3
  c.train.stop_at_step = 0  # >0: save and exit there, as a preemption would (fixed-length allocations)
  c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU when the device is not in the table
  c.train.unigram_baseline_batches = 20  # training batches counted for the unigram baseline

  # Mesh axis sizes within one slice (see llmjax/sharding.py); the mesh axis is ICI x DCN.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all remaining devices
  # Context parallelism: each row's positions split over `sequence` devices (every rule set
  # maps `length` there); for rows too long for one chip's activations. Within a host.
  c.mesh.sequence = 1
  # Expert parallelism (MoE models): expert weights split over it, and the batch too.
  # It must divide model.num_experts.
  c.mesh.expert = 1
  c.mesh.tensor = 1  # >1 needs sharding.rules='fsdp_tensor'; keep it within a host's chips
  # Slices along each axis (multi-slice over DCN); their product is the number of slices.
  # Only gradients' all-reduce should cross DCN, so slices normally go to dcn_data.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_sequence = 1
  c.mesh.dcn_expert = 1
  c.mesh.dcn_tensor = 1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = 'fsdp'  # a key of llmjax.sharding.RULES: 'data', 'fsdp', 'fsdp_tensor'

  c.init = ml_collections.ConfigDict()
  c.init.params_dir = ''  # start from the latest params of another llmjax workdir
  # Or from a Hugging Face checkpoint dir (config.json + safetensors), read straight into the
  # state's shardings; its tokenizer becomes the run's unless data.tokenizer_path is set.
  c.init.hf_dir = ''
  # With init.hf_dir (the base): a PEFT LoRA adapter dir (adapter_config.json +
  # adapter_model.safetensors) whose adapters become the run's initial lora_a / lora_b, to
  # continue training them. model.lora_rank / lora_alpha / lora_targets must equal the
  # adapter's r / lora_alpha / target_modules (checked, not taken: the run's keys stay what
  # they say). Export back with `llmjax.convert --to=peft`.
  c.init.peft_dir = ''

  # Prompt learning (PEFT's names; llmjax/models/transformer.py): 'prompt_tuning' (Lester et
  # al. 2021) learns num_virtual_tokens input embeddings placed before every sequence;
  # 'prefix_tuning' (Li and Liang 2021, without the reparametrising MLP; P-tuning v2) learns
  # num_virtual_tokens keys and values per layer that every position attends to. The base is
  # frozen and only they train (with model.lora_rank=0). Each packed document sees them. Mirrored
  # into model.virtual_tokens / model.num_virtual_tokens by `validate`; both export to PEFT's
  # format with `llmjax.convert --to=peft` (interop/peft.py reads it too). Not with DPO yet.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = ''  # '', 'prompt_tuning', 'prefix_tuning'
  c.peft.num_virtual_tokens = 0
  # prompt_tuning: '' = random N(0, 1) (PEFT's RANDOM); else the embeddings of this text's
  # tokens (the run's tokenizer, BOS first when it has one, as PEFT's TEXT init tokenizes),
  # repeated or cut to num_virtual_tokens, taken from the (pretrained) base embedding.
  c.peft.prompt_init_text = ''

  # Tasks scored at every eval besides eval_loss (llmjax.eval.suite): built-in task names,
  # 'KIND:FILE' or 'NAME=KIND:FILE' with KIND generate, multiple_choice or perplexity; logged as
  # eval_<name>_<metric>. Each file is checked when the run starts.
  c.eval = ml_collections.ConfigDict()
  c.eval.tasks = ()
  c.eval.max_new_tokens = 32  # generate: greedy tokens per answer at most
  c.eval.stop = ()  # generate: answers are cut at the first of these strings (built-in: '\n')
  c.eval.chat = False  # generate files: prompts as user turns of the run's chat template
  c.eval.batch_size = 32  # sequences per forward pass or generate call
  c.eval.max_examples = 0  # >0: only the first N records of each task (a quicker, noisier eval)
  # True: the run's last eval scores the whole validation split (every window, the last batch
  # padded) instead of its first data.eval_batches batches, and also logs eval_bits_per_char
  # (the summed NLL in bits over the characters of the scored targets); train.objective='lm'.
  c.eval.full_split = False

  # train.objective='dpo' (llmjax/train/dpo.py, formulas and defaults as TRL 1.16).
  c.dpo = ml_collections.ConfigDict()
  # sigmoid (DPO), hinge, ipo, robust, sigmoid_norm (Tulu 3), simpo and orpo (reference-free),
  # kto (unpaired data)
  c.dpo.loss = 'sigmoid'
  c.dpo.beta = 0.1  # the KL penalty's strength; rewards are beta x log-ratio
  c.dpo.label_smoothing = 0.0  # robust / simpo: the probability that a preference is flipped
  c.dpo.simpo_gamma = 0.5  # simpo: the target reward margin
  c.dpo.desirable_weight = 1.0  # kto: weights of desirable / undesirable examples' losses
  c.dpo.undesirable_weight = 1.0
  c.dpo.sft_weight = 0.0  # > 0: adds that times the chosen completions' NLL (RPO)
  # The reference model: another checkpoint (architecture checked), else the policy's initial
  # weights (init.hf_dir / init.params_dir; a LoRA policy's own base, adapters off).
  c.dpo.ref_hf_dir = ''
  c.dpo.ref_params_dir = ''
  # True: one pass before training writes the reference's log-probs of every pair into
  # WORKDIR/reference_logps/ (keyed by data, reference and tokenizer; a restart reuses them),
  # and training never loads the reference (batches carry `ref_logps`).
  c.dpo.precompute_ref = False
  # train.objective='reward' (llmjax/train/reward.py, as TRL's RewardTrainer).
  c.reward = ml_collections.ConfigDict()
  c.reward.center_coef = 0.0  # TRL's center_rewards_coefficient: + coef x mean((r_c + r_r)^2)

  # train.objective='grpo', 'rloo' or 'ppo' (llmjax/rl: online RL on the trainer's own mesh;
  # formulas, names and defaults as TRL 1.16's GRPOTrainer / RLOOTrainer, PPO as TRL's last
  # PPOTrainer). train.batch_size counts completions: batch_size //
  # num_generations prompts per rollout batch.
  c.rl = ml_collections.ConfigDict()
  c.rl.num_generations = 8  # completions sampled per prompt (a group)
  c.rl.max_completion_length = 256  # sampled tokens per completion at most (then truncated)
  c.rl.temperature = 1.0  # of the rollouts, and of the log-probs the loss compares
  c.rl.top_p = 1.0
  c.rl.top_k = 0
  # 'dapo' (TRL's default) / 'bnpo': mean over completion tokens; 'grpo': per-completion token
  # mean, then mean over completions; 'dr_grpo': sum / (completions x max_completion_length).
  c.rl.loss_type = 'dapo'
  c.rl.scale_rewards = 'group'  # advantages divided by the group's std, 'batch''s, or 'none'
  c.rl.epsilon_low = 0.2  # the ratio is clipped to [1 - epsilon_low, 1 + epsilon_high]
  c.rl.epsilon_high = 0.2  # DAPO's clip-higher sets it above epsilon_low (0.28)
  c.rl.beta = 0.0  # KL to the reference (k3); 0 (TRL's default): no reference is loaded
  c.rl.num_iterations = 1  # optimizer steps per rollout batch (against its old log-probs)
  c.rl.importance_sampling_level = 'token'  # 'sequence': one ratio per completion (GSPO)
  # Correction for rollouts from another program than the trainer's ('token', 'sequence');
  # '' here, where the engine runs the trainer's model on the same params.
  c.rl.sampler_is = ''
  c.rl.sampler_is_cap = 3.0
  # Reward functions (llmjax/rl/rewards.py): built-ins 'exact_match', 'json_format',
  # 'length_penalty', or 'module:function' on the Python path; weights default to 1 each.
  c.rl.reward_fns = ('exact_match',)
  c.rl.reward_weights = ()
  c.rl.normalize_advantages = False  # RLOO: standardise the advantages over the batch
  # PPO (llmjax/rl/ppo.py; rl.beta is its KL coefficient, rl.epsilon_* its clip range,
  # rl.num_iterations its ppo_epochs): discount and GAE lambda, the value loss's weight and
  # clip range around the rollout's values, whitened advantages (TRL's PPOConfig defaults).
  c.rl.gamma = 1.0
  c.rl.lam = 0.95
  c.rl.vf_coef = 0.1
  c.rl.cliprange_value = 0.2
  c.rl.whiten_advantages = True

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ()  # printed with their continuations at every eval
  c.sample.max_new_tokens = 48
  c.sample.temperature = 0.0  # 0: greedy, so samples are reproducible
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  # transformers' definitions (llmjax/infer/processors.py); the defaults are off.
  c.sample.min_p = 0.0
  c.sample.repetition_penalty = 1.0
  c.sample.presence_penalty = 0.0  # OpenAI's, in [-2, 2]
  c.sample.frequency_penalty = 0.0  # OpenAI's, in [-2, 2]
  c.sample.no_repeat_ngram_size = 0
  # Beam search (llmjax/infer/beam.py, transformers' definitions; needs temperature 0); the
  # best beam is printed. 1: off.
  c.sample.num_beams = 1
  c.sample.length_penalty = 1.0  # beam score = sum log-prob / generated length ** this
  c.sample.early_stopping = 'false'  # 'true', 'false' or 'never', as transformers defines them
  return c


def tiny_rl_config(params_dir: str, tasks: str) -> ml_collections.ConfigDict:
  """The base of the CPU online-RL experiments (`grpo.py:tiny`, `ppo.py:tiny`): the
  quickstart's architecture continued from the tiny SFT run `params_dir` on the train prompts
  of the built-in `tasks` ('a+b') with the exact-match reward, held-out exact match at evals."""
  c = base_config('tiny', vocab_size=1024, max_seq_len=1024)  # the quickstart's
  c.init.params_dir = params_dir  # its tokenizer comes with it
  names = tuple(tasks.split('+'))
  c.data.builtin_tasks = names
  c.eval.tasks = names  # held-out exact match (greedy) at every eval
  c.eval.max_new_tokens = 8
  # Answers are at most 7 tokens and EOS (experiments/sft.py:tiny's eval.max_new_tokens).
  c.rl.max_completion_length = 8
  c.data.seq_len = 32  # a ~12-token prompt + 8
  c.rl.reward_fns = ('exact_match',)
  return c
