"""Builds the DPO-family goldens under tests/golden/dpo/ by running TRL 1.16 for one step.

    /tmp/hf/bin/python tools/make_dpo_goldens.py

Runs in a Python with torch + transformers + trl (never the test suite's venv). It
  1. builds two tiny random LlamaForCausalLM checkpoints, `policy` and a different `ref`
     (2 layers, hidden 32, GQA 4/2 heads, the byte-level BPE tokenizer of
     tests/golden/llama_gqa_llama3), saved with save_pretrained + tokenizer files;
  2. runs each trainer for one step at learning rate 0, float32, on CPU, with the 8
     preference pairs below as one batch (per_device_train_batch_size=8):
       DPOTrainer   loss_type sigmoid, hinge, ipo, robust (label_smoothing=0.1),
                    sigmoid_norm, and RPO = loss_type ['sigmoid', 'sft'] with loss_weights
                    [1, 0.5] (TRL 1.16 has no `rpo_alpha`; this is its RPO)
       CPOTrainer   loss_type='simpo' (simpo_gamma=0.7), once with cpo_alpha=0 (SimPO) and
                    once with cpo_alpha=0.4 and label_smoothing=0.1
       ORPOTrainer  beta=0.3
       KTOTrainer   8 unpaired examples (5 desirable, 3 undesirable), desirable_weight=1.3,
                    undesirable_weight=0.7, with `ref`; and again with the two models swapped,
                    so that one run has a positive KL estimate and the other a clamped one;
     every run with beta=0.3 (TRL's default is 0.1, so a wrong default cannot pass);
  3. writes tests/golden/dpo/golden.json: per run, the trainer, its arguments, TRL's logged
     step-1 metrics (`log_history[0]`), the loss compute_loss returned, and the exact token
     ids TRL fed the model (read back from the trainer's tokenized train_dataset).

Token ids per trainer (what the llmjax tests rebuild their batches from):
  DPO:       prompt_ids, chosen_ids, rejected_ids (sequence = prompt + completion; the
             completion, EOS included, is what the log-probs sum over)
  CPO/ORPO:  chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (these
             trainers prepend BOS themselves; labels are -100 on the prompt)
  KTO:       prompt_ids, completion_ids, KL_completion_ids, label
"""

import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import trl
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

warnings.filterwarnings('ignore')
with warnings.catch_warnings():
  from trl.experimental.cpo import CPOConfig, CPOTrainer
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'golden', 'dpo')
TOKENIZER = os.path.join(ROOT, 'tests', 'golden', 'llama_gqa_llama3')
BETA = 0.3

# The tokenizer's tiny BPE covers lowercase letters, spaces and a little punctuation only.
PAIRS = [
    ('the cat sat on', ' a mat', ' the moon was not here at all'),
    ('what is the answer', ' it is one', ' no'),
    ('hello', ' world', ' there is a cat on the mat'),
    ('a tale of two cities was written by', ' dickens', ' a cat'),
    ('the sun is', ' hot and bright in the day', ' cold'),
    ('say something nice', ' you are kind', ' go away now'),
    ('count', ' one two three', ' three two one two three'),
    ('the mat is on the', ' floor', ' roof of the house'),
]
# KTO: unpaired (prompt, completion, label): the chosen of pairs 0-4, the rejected of 5-7.
UNPAIRED = [(p, c, True) for p, c, _ in PAIRS[:5]] + [(p, r, False) for p, _, r in PAIRS[5:]]


def make_model(seed: int) -> LlamaForCausalLM:
  """Tiny random Llama, weights wider than transformers' init so log-probs differ clearly."""
  torch.manual_seed(seed)
  cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    tie_word_embeddings=False, attention_dropout=0.0)
  model = LlamaForCausalLM(cfg).float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def save(model, name):
  d = os.path.join(OUT, name)
  shutil.rmtree(d, ignore_errors=True)
  model.save_pretrained(d, safe_serialization=True)
  for f in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(TOKENIZER, f), d)
  return d


class Recorder:
  """Mixin: keeps the (unrounded) loss each compute_loss returns."""

  def compute_loss(self, *args, **kwargs):
    out = super().compute_loss(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    self.recorded_losses.append(float(loss.detach()))
    return out


def recording(cls):
  return type('Recording' + cls.__name__, (Recorder, cls), {'recorded_losses': None})


COMMON = dict(learning_rate=0.0, per_device_train_batch_size=8, max_steps=1, logging_steps=1,
              report_to=[], bf16=False, fp16=False, use_cpu=True, seed=0, save_strategy='no',
              gradient_checkpointing=False, disable_dropout=True, beta=BETA)


def run(trainer_cls, config_cls, policy_dir, ref_dir, dataset, args):
  tok = AutoTokenizer.from_pretrained(policy_dir)
  model = LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
  kw = {}
  if ref_dir is not None:
    kw['ref_model'] = LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
  with tempfile.TemporaryDirectory() as tmp:
    cfg = config_cls(output_dir=tmp, **COMMON, **args)
    cls = recording(trainer_cls)
    trainer = cls(model=model, args=cfg, train_dataset=dataset, processing_class=tok, **kw)
    trainer.recorded_losses = []
    trainer.train()
  ds = trainer.train_dataset
  metrics = {k: v for k, v in trainer.state.log_history[0].items()
             if k not in ('epoch', 'step', 'learning_rate', 'grad_norm', 'num_tokens')}
  return {'trainer': trainer_cls.__name__, 'args': args, 'metrics': metrics,
          'compute_loss': trainer.recorded_losses[0], 'columns': ds.column_names, 'ds': ds}


def main():
  os.makedirs(OUT, exist_ok=True)
  policy_dir = save(make_model(0), 'policy')
  ref_dir = save(make_model(1), 'ref')
  pairs = Dataset.from_dict({'prompt': [p for p, _, _ in PAIRS],
                             'chosen': [c for _, c, _ in PAIRS],
                             'rejected': [r for _, _, r in PAIRS]})
  unpaired = Dataset.from_dict({'prompt': [p for p, _, _ in UNPAIRED],
                                'completion': [c for _, c, _ in UNPAIRED],
                                'label': [l for _, _, l in UNPAIRED]})
  runs = {
      'sigmoid': (DPOTrainer, DPOConfig, True, pairs, dict(loss_type=['sigmoid'])),
      'hinge': (DPOTrainer, DPOConfig, True, pairs, dict(loss_type=['hinge'])),
      'ipo': (DPOTrainer, DPOConfig, True, pairs, dict(loss_type=['ipo'])),
      'robust': (DPOTrainer, DPOConfig, True, pairs,
                 dict(loss_type=['robust'], label_smoothing=0.1)),
      'sigmoid_norm': (DPOTrainer, DPOConfig, True, pairs, dict(loss_type=['sigmoid_norm'])),
      'rpo': (DPOTrainer, DPOConfig, True, pairs,
              dict(loss_type=['sigmoid', 'sft'], loss_weights=[1.0, 0.5])),
      'simpo': (CPOTrainer, CPOConfig, False, pairs,
                dict(loss_type='simpo', simpo_gamma=0.7, cpo_alpha=0.0)),
      'simpo_nll_smooth': (CPOTrainer, CPOConfig, False, pairs,
                           dict(loss_type='simpo', simpo_gamma=0.7, cpo_alpha=0.4,
                                label_smoothing=0.1)),
      'orpo': (ORPOTrainer, ORPOConfig, False, pairs, dict()),
      'kto': (KTOTrainer, KTOConfig, True, unpaired,
              dict(desirable_weight=1.3, undesirable_weight=0.7)),
      'kto_swapped': (KTOTrainer, KTOConfig, True, unpaired,
                      dict(desirable_weight=1.3, undesirable_weight=0.7)),
  }
  golden = {'trl_version': trl.__version__, 'torch_version': torch.__version__,
            'beta': BETA, 'pairs': PAIRS, 'unpaired': UNPAIRED, 'runs': {}}
  for name, (tcls, ccls, with_ref, data, args) in runs.items():
    pol, ref = (ref_dir, policy_dir) if name == 'kto_swapped' else (policy_dir, ref_dir)
    r = run(tcls, ccls, pol, ref if with_ref else None, data, args)
    ds = r.pop('ds')
    if tcls is DPOTrainer:
      keys = ('prompt_ids', 'chosen_ids', 'rejected_ids')
    elif tcls is KTOTrainer:
      keys = ('prompt_ids', 'completion_ids', 'KL_completion_ids', 'label')
    else:
      keys = ('chosen_input_ids', 'chosen_labels', 'rejected_input_ids', 'rejected_labels')
    r['ids'] = {k: [list(map(int, x)) if isinstance(x, list) else x for x in ds[k]]
                for k in keys}
    r['policy'] = os.path.basename(pol)
    r['ref'] = os.path.basename(ref) if with_ref else None
    del r['columns']
    golden['runs'][name] = r
    print(name, json.dumps(r['metrics']))
  with open(os.path.join(OUT, 'golden.json'), 'w') as f:
    json.dump(golden, f, indent=1)
  print('wrote', OUT)


if __name__ == '__main__':
  main()
