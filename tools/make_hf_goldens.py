"""Builds the Hugging Face golden checkpoints under tests/golden/ and checks llmjax's exports.

    /tmp/hf/bin/python tools/make_hf_goldens.py            # build goldens, then check exports
    /tmp/hf/bin/python tools/make_hf_goldens.py --check    # only check exports of existing goldens
    /tmp/hf/bin/python tools/make_hf_goldens.py --no-check # only build the goldens
    /tmp/hf/bin/python tools/make_hf_goldens.py --only=llama_dynamic_ntk  # one golden (same seed)

Runs in a Python with torch + transformers (never the test suite's venv). For each family it
builds a tiny random-weight model with transformers (eager attention, float32), saves it with
`save_pretrained` under tests/golden/<name>/ and records, for a fixed batch of token ids:
    golden.npz    tokens [2, 16] int32, logits [2, 16, vocab] float32 (one forward pass)
    golden.json   {"prompt": [[...], [...]], "generated": [[32 ids], [32 ids]]} from
                  model.generate(do_sample=False, max_new_tokens=32) with EOS disabled
Weights are drawn wider than transformers' init (and biases/norm scales are not left at 0/1) so
that every tensor matters and greedy decoding has clear margins between the top two tokens.

The export check runs llmjax (in LLMJAX_PYTHON, default /work/main/.venv/bin/python, no torch) to import each golden and export it back
(`python -m llmjax.convert --from=hf` then `--to=hf`), loads the export with transformers and
compares logits with the golden's (max |diff| <= 1e-4).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
LLMJAX_PYTHON = os.environ.get('LLMJAX_PYTHON', '/work/main/.venv/bin/python')
VOCAB = 256
PROMPT_LEN = 16  # the window of `mistral_window` (8) is shorter than prompt + continuation
NEW_TOKENS = 32

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

# name -> (model class, config). Each covers one or more features the importer must get right.
MODELS = {
    # GQA (4 query heads over 2 kv heads), untied head, llama3 RoPE scaling; sharded + index.
    'llama_gqa_llama3': (LlamaForCausalLM, lambda: LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                      'high_freq_factor': 4.0, 'original_max_position_embeddings': 32})),
    # MQA, tied embeddings, linear RoPE scaling, head_dim != hidden/heads; sentencepiece tokenizer.
    'llama_mqa_tied_linear': (LlamaForCausalLM, lambda: LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
        tie_word_embeddings=True, rope_scaling={'rope_type': 'linear', 'factor': 2.0})),
    # Dynamic NTK scaling: identical to plain RoPE below max_position_embeddings.
    'llama_dynamic': (LlamaForCausalLM, lambda: LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={'rope_type': 'dynamic', 'factor': 2.0})),
    # qkv bias, tied embeddings, GQA; tokenizer.json with a chat template.
    'qwen2_bias_tied': (Qwen2ForCausalLM, lambda: Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=1_000_000.0, use_sliding_window=False, sliding_window=8)),
    # Qwen2 with every layer sliding (max_window_layers=0), window 8 < 48 tokens.
    'qwen2_all_sliding': (Qwen2ForCausalLM, lambda: Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    # Sliding window 8 < prompt (16) + continuation (32), GQA, untied.
    'mistral_window': (MistralForCausalLM, lambda: MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        tie_word_embeddings=False)),
    # Learned positions, LayerNorm, gelu_new, fused Conv1D c_attn, tied head.
    'gpt2': (GPT2LMHeadModel, lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2)),
    # Dynamic NTK scaling in use: max_position_embeddings 8 < the prompt (16), so the forward
    # pass runs with the base grown for 16 positions and every decoding step grows it further
    # (transformers recomputes it from the largest position + 1 of each call). Last, so the
    # seeds of the others are unchanged.
    'llama_dynamic_ntk': (LlamaForCausalLM, lambda: LlamaConfig(
        **dict(COMMON, max_position_embeddings=8), num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={'rope_type': 'dynamic', 'factor': 4.0})),
}
SHARDED = {'llama_gqa_llama3': '150KB'}  # max_shard_size: several shards + index.json


def randomize(model, seed: int) -> None:
  """Every parameter drawn at random: norms near 1, biases and weights N(0, 0.1^2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.1
      is_norm_scale = ('norm' in name or '.ln_' in name) and name.endswith('weight')
      p.copy_(1.0 + noise if is_norm_scale else noise * (3.0 if 'embed' in name or 'wte' in name or 'wpe' in name else 1.0))


def tokens(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, VOCAB, size=(2, PROMPT_LEN)).astype(np.int32)


def logits_of(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def greedy(model, ids: np.ndarray) -> list[list[int]]:
  # EOS off so that all 32 steps are recorded (the test's loop has no EOS either).
  with torch.no_grad():
    out = model.generate(torch.tensor(ids, dtype=torch.long), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(ids.shape, dtype=torch.long))
  return out[:, ids.shape[1]:].tolist()


def write_bpe_tokenizer(path: str, chat_template: str | None) -> None:
  """A tiny byte-level BPE tokenizer.json (< VOCAB ids) and its tokenizer_config.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # The alphabet is the characters of the text (not all 256 bytes), so the vocab fits VOCAB.
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 56, special_tokens=['<pad>', '<s>', '</s>'],
                                show_progress=False)
  text = ['the quick brown fox jumps over the lazy dog', 'hello world, hello llmjax'] * 20
  tok.train_from_iterator(text, trainer)
  tok.save(os.path.join(path, 'tokenizer.json'))
  config = {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>',
            'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': 128}
  if chat_template:
    config['chat_template'] = chat_template
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def write_sentencepiece_tokenizer(path: str) -> None:
  """A tiny sentencepiece tokenizer.model (ids 0..3 = unk, bos, eos, pad) + special-token maps."""
  import io
  import sentencepiece as spm
  model = io.BytesIO()
  text = ['the quick brown fox jumps over the lazy dog', 'hello world, hello llmjax',
          'sentencepiece trains on lines of text'] * 30
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text), model_writer=model, vocab_size=80, model_type='bpe',
      unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False, minloglevel=2)
  with open(os.path.join(path, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())
  with open(os.path.join(path, 'special_tokens_map.json'), 'w') as f:
    json.dump({'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
               'pad_token': '<pad>'}, f, indent=2)
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': True}, f, indent=2)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build(name: str, seed: int) -> None:
  cls, make_config = MODELS[name]
  config = make_config()
  config._attn_implementation = 'eager'
  torch.manual_seed(seed)
  model = cls(config).eval()
  randomize(model, seed)
  out = os.path.join(GOLDEN, name)
  shutil.rmtree(out, ignore_errors=True)
  kwargs = {'max_shard_size': SHARDED[name]} if name in SHARDED else {}
  model.save_pretrained(out, **kwargs)
  if name in ('llama_gqa_llama3', 'qwen2_bias_tied'):
    write_bpe_tokenizer(out, CHAT_TEMPLATE if name == 'qwen2_bias_tied' else None)
  if name == 'llama_mqa_tied_linear':
    write_sentencepiece_tokenizer(out)
  ids = tokens(seed)
  logits = logits_of(model, ids)
  gen = greedy(model, ids)
  np.savez(os.path.join(out, 'golden.npz'), tokens=ids, logits=logits)
  with open(os.path.join(out, 'golden.json'), 'w') as f:
    json.dump({'prompt': ids.tolist(), 'generated': gen}, f)
  # The smallest top-1 vs top-2 logit gap of the forward pass: how robust greedy ids are.
  top2 = np.sort(logits, axis=-1)[..., -2:]
  print(f'{name}: saved ({sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) // 1024} KB),'
        f' min top-2 gap {float(np.min(top2[..., 1] - top2[..., 0])):.2e}')


def check_export(name: str) -> float:
  """Import with llmjax, export back to HF, load with transformers: max |logit diff|."""
  src = os.path.join(GOLDEN, name)
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    for args in (['--from=hf', f'--src={src}', f'--dst={tmp}/llmjax'],
                 ['--to=hf', f'--src={tmp}/llmjax', f'--dst={tmp}/hf', '--max_shard_bytes=100000']):
      subprocess.run([LLMJAX_PYTHON, '-m', 'llmjax.convert', *args], check=True, env=env, cwd=ROOT)
    cls = MODELS[name][0]
    model = cls.from_pretrained(f'{tmp}/hf', attn_implementation='eager').eval()
    golden = np.load(os.path.join(src, 'golden.npz'))
    diff = float(np.max(np.abs(logits_of(model, golden['tokens']) - golden['logits'])))
    shards = sorted(f for f in os.listdir(f'{tmp}/hf') if f.endswith('.safetensors'))
  status = 'OK' if diff <= 1e-4 else 'FAIL'
  print(f'export check {name}: transformers loads llmjax export ({len(shards)} shards),'
        f' max |logit diff| {diff:.2e} {status}')
  return diff


def main(argv: list[str]) -> int:
  torch.set_num_threads(2)
  print(f'transformers {transformers.__version__}, torch {torch.__version__}')
  only = [a.split('=', 1)[1] for a in argv if a.startswith('--only=')]
  names = only or list(MODELS)
  if '--check' not in argv:
    for name in names:
      build(name, list(MODELS).index(name))
  if '--no-check' in argv:  # before llmjax.convert exists
    return 0
  worst = max(check_export(name) for name in names)
  return 0 if worst <= 1e-4 else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
