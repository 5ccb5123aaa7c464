"""Builds tests/golden/reward/: a tiny random reward model and TRL RewardTrainer's step-1 metrics.

    /tmp/hf/bin/python tools/make_reward_goldens.py

Runs in a Python with torch + transformers + trl (never the test suite's venv). It writes:
    config.json, model.safetensors   a random LlamaForSequenceClassification (num_labels=1,
                                     pad_token_id=0, float32), saved with save_pretrained
    tokenizer.json, tokenizer_config.json  copied from tests/golden/llama_gqa_llama3 (<pad>=0,
                                     <s>=1, </s>=2; no BOS added by its post-processor)
    pairs.jsonl                      the {"prompt", "chosen", "rejected", "margin"} records
    golden.json                      per TRL run ("plain": center_rewards_coefficient=None;
                                     "center": 0.1): the step-1 logged metrics (learning_rate=0,
                                     batch 8 pairs, one step), the batch TRL fed (input_ids and
                                     attention_mask [16, T]: the 8 chosen then the 8 rejected,
                                     right-padded with pad_token_id; margin [8]), the rewards
                                     transformers computed on it ([16]), and TRL's tokenization
                                     of each record (chosen_ids, rejected_ids); plus
                                     rewards_pad_eos: each sequence alone with pad_token_id=EOS
                                     (TRL's fallback when a tokenizer has no pad token), where
                                     transformers reads the score at the token before the EOS.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'golden', 'reward')
TOKENIZER = os.path.join(ROOT, 'tests', 'golden', 'llama_gqa_llama3')

# Words of the tokenizer's training text only (its byte-level alphabet is those characters).
PAIRS = [
    ('the quick brown fox', ' jumps over the lazy dog', ' jumps the dog', 0.0),
    ('hello', ' world', ' llmjax world hello', 0.0),
    ('the lazy dog', ' jumps over the fox', ' the', 0.5),  # the one pair with a margin
    ('hello world,', ' hello llmjax', ' the quick brown', 0.0),
    ('the fox jumps over', ' the lazy dog', ' hello', 0.0),
    ('brown', ' fox', ' dog jumps over the quick brown fox', 0.0),
    ('the quick', ' brown fox jumps', ' lazy', 0.0),
    ('hello llmjax,', ' hello world', ' the dog the dog', 0.0),
]


def build_model() -> LlamaForSequenceClassification:
  config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=1,
                       tie_word_embeddings=False, rope_theta=10000.0)
  config._attn_implementation = 'eager'
  torch.manual_seed(0)
  model = LlamaForSequenceClassification(config).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # wider than transformers' init, so every tensor matters
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.1
      p.copy_(1.0 + noise if 'norm' in name else noise * (3.0 if 'embed' in name or 'score' in name else 1.0))
  return model


def run_trl(model_dir: str, center, work: str) -> dict:
  tokenizer = AutoTokenizer.from_pretrained(model_dir)
  model = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                         attn_implementation='eager')
  data = Dataset.from_list([{'prompt': p, 'chosen': c, 'rejected': r, 'margin': m}
                            for p, c, r, m in PAIRS])
  args = trl.RewardConfig(output_dir=work, learning_rate=0.0, max_steps=1, logging_steps=1,
                          per_device_train_batch_size=8, gradient_accumulation_steps=1,
                          report_to=[], save_strategy='no', use_cpu=True, bf16=False,
                          center_rewards_coefficient=center, seed=0, dataloader_num_workers=0)
  fed = []

  class Capture(trl.trainer.reward_trainer.DataCollatorForPreference):
    def torch_call(self, examples):
      out = super().torch_call(examples)
      fed.append({k: v.clone() for k, v in out.items()})
      return out

  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data,
                              processing_class=tokenizer,
                              data_collator=Capture(pad_token_id=tokenizer.pad_token_id))
  trainer.train()
  logged = next(h for h in trainer.state.log_history if 'accuracy' in h)
  batch = fed[0]
  with torch.no_grad():
    rewards = model(input_ids=batch['input_ids'],
                    attention_mask=batch['attention_mask']).logits[:, 0]
  tokenized = [{'chosen_ids': ex['chosen_ids'], 'rejected_ids': ex['rejected_ids']}
               for ex in trainer.train_dataset]
  return {'center_rewards_coefficient': center,
          'metrics': {k: logged[k] for k in ('loss', 'accuracy', 'margin', 'mean_reward',
                                             'min_reward', 'max_reward')},
          'input_ids': batch['input_ids'].tolist(),
          'attention_mask': batch['attention_mask'].tolist(),
          'margin': batch['margin'].tolist(), 'rewards': rewards.tolist(),
          'tokenized': tokenized, 'pad_token_id': tokenizer.pad_token_id,
          'eos_token_id': tokenizer.eos_token_id}


def rewards_pad_eos(model_dir: str, sequences: list[list[int]], eos: int) -> list[float]:
  model = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                         attn_implementation='eager').eval()
  model.config.pad_token_id = eos
  out = []
  with torch.no_grad():
    for ids in sequences:
      out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
  return out


def main() -> int:
  torch.set_num_threads(2)
  print(f'transformers {transformers.__version__}, trl {trl.__version__}, torch {torch.__version__}')
  shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT)
  build_model().save_pretrained(OUT)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copyfile(os.path.join(TOKENIZER, name), os.path.join(OUT, name))
  with open(os.path.join(OUT, 'pairs.jsonl'), 'w') as f:
    for p, c, r, m in PAIRS:
      f.write(json.dumps({'prompt': p, 'chosen': c, 'rejected': r, 'margin': m}) + '\n')
  import tempfile
  runs = {}
  with tempfile.TemporaryDirectory() as work:
    for name, center in (('plain', None), ('center', 0.1)):
      runs[name] = run_trl(OUT, center, os.path.join(work, name))
  plain = runs['plain']
  sequences = [[i for i, a in zip(ids, am) if a] for ids, am in
               zip(plain['input_ids'], plain['attention_mask'])]
  golden = {'versions': {'transformers': transformers.__version__, 'trl': trl.__version__,
                         'torch': torch.__version__},
            'runs': runs, 'rewards_pad_eos': rewards_pad_eos(OUT, sequences, plain['eos_token_id'])}
  with open(os.path.join(OUT, 'golden.json'), 'w') as f:
    json.dump(golden, f, indent=1)
  for name, run in runs.items():
    print(name, run['metrics'])
  size = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
  print(f'wrote {OUT} ({size // 1024} KB)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
